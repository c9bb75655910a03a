"""Gradient accumulation: ``train.accumulate: 2`` at micro-batch B is one optimiser step over 2B images.

Registry-driven, through the trainer's own step functions (``accumulate_gradients``, ``apply_update``).
Two steps with ``on_step_end`` between them, so state that a step changes (queues, centres, EMA
targets) is checked too, as in the 2-process test. Batch norm is replaced by the identity here: its
statistics are per micro-batch in every accumulation scheme, which is not what is being tested.

- Methods whose loss is a mean of per-sample terms (``batch_coupled = False``): accumulated micro-batches
  give the loss, gradients and state of ONE step at batch 2B.
- Methods that compare the samples of a batch (``batch_coupled = True``: in-batch negatives, batch
  statistics): the reference is each micro-batch computed on its own copy of the model from the same
  pre-step state, gradients averaged; and a step at 2B must differ (else the flag is wrong).
"""
from __future__ import annotations

import copy

import pytest
import torch
from dist_worker import STEPS, VARIANTS, assert_grads_close, build, captions
from torch import nn

from sslhub.methods.base import Batch, Method
from sslhub.methods.registry import list_methods
from sslhub.train.trainer import accumulate_gradients, apply_update

B = 4  # micro-batch
SMALL_BATCH = {"moco_v2": {"bn_groups": 2}}  # shuffling-BN groups must divide a micro-batch


def without_batchnorm(method: Method) -> Method:
    for name, module in list(method.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return method


def named_grads(method: Method) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in method.named_parameters() if p.requires_grad}


def batches(images: torch.Tensor, texts: list[str], step: int, chunks: int, needs_text: bool) -> list[Batch]:
    """The trainer's shape: one generator per step, shared by the step's micro-batches."""
    rng = torch.Generator().manual_seed(step)
    n = images.shape[0] // chunks
    return [Batch(images[i * n:(i + 1) * n], texts=texts[i * n:(i + 1) * n] if needs_text else None, rng=rng,
                  step=step, seed=step, offset=i * n) for i in range(chunks)]


def state(method: Method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.state_dict().items() if v.is_floating_point()}


def run_trainer_steps(method: Method, images, texts, chunks: int) -> list[dict]:
    """STEPS optimiser steps through the trainer's functions, each over ``chunks`` micro-batches."""
    groups = method.optim_groups()
    params = [p for p in method.parameters() if p.requires_grad]
    opts = {k: torch.optim.SGD(ps, lr=0.05) for k, ps in groups.items()}
    out = []
    for s in range(STEPS):
        logged = accumulate_gradients(method, groups, batches(images, texts, s, chunks, method.needs_text))
        grads = named_grads(method)
        apply_update(method, opts, params, s, STEPS, clip_grad=1.0)  # unit-norm steps, as the 2-process test
        out.append({"loss": logged["loss"], "grads": grads, "state": state(method)})
    return out


def run_reference_steps(method: Method, images, texts, chunks: int) -> list[dict]:
    """Each micro-batch's loss and gradient on a fresh copy of the pre-step model; their mean is applied."""
    groups = method.optim_groups()
    params = [p for p in method.parameters() if p.requires_grad]
    opts = {k: torch.optim.SGD(ps, lr=0.05) for k, ps in groups.items()}
    out = []
    for s in range(STEPS):
        losses, grads = [], []
        for batch in batches(images, texts, s, chunks, method.needs_text):
            twin = copy.deepcopy(method)
            res = twin.loss(batch)
            res["loss"].backward()
            losses.append(float(res["loss"].detach()))
            grads.append(named_grads(twin))
        mean_grad = {n: torch.stack([g[n] for g in grads]).mean(0) for n in grads[0]}
        for n, p in method.named_parameters():
            if p.requires_grad:
                p.grad = mean_grad[n].clone()
        apply_update(method, opts, params, s, STEPS, clip_grad=1.0)  # unit-norm steps, as the 2-process test
        out.append({"loss": sum(losses) / len(losses), "grads": mean_grad, "state": state(method)})
    return out


def assert_same(got: list[dict], want: list[dict], what: str) -> None:
    for s in range(STEPS):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5, abs=1e-6), f"{what}: loss of step {s}"
        assert_grads_close(got[s]["grads"], want[s]["grads"], s)
        for k, v in want[s]["state"].items():
            assert torch.allclose(got[s]["state"][k], v, rtol=1e-4, atol=1e-5), \
                f"{what}: state {k} after step {s}: max diff {(got[s]['state'][k] - v).abs().max():.3g}"


@pytest.mark.parametrize("name", [*list_methods(), *VARIANTS])
def test_accumulated_micro_batches_are_one_step(tmp_path, name):
    images = torch.randint(0, 256, (2 * B, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    texts = captions(2 * B)
    fresh = without_batchnorm(build(name, tmp_path, SMALL_BATCH.get(VARIANTS.get(name, (name,))[0])))
    accumulated = run_trainer_steps(copy.deepcopy(fresh), images, texts, chunks=2)
    one_batch = run_trainer_steps(copy.deepcopy(fresh), images, texts, chunks=1)
    if not fresh.batch_coupled:
        assert_same(accumulated, one_batch, f"{name}: accumulate 2 x {B} vs one batch of {2 * B}")
        return
    assert_same(accumulated, run_reference_steps(copy.deepcopy(fresh), images, texts, chunks=2),
                f"{name}: accumulate 2 x {B} vs the mean of 2 independent micro-batches")
    # the coupling shows in the loss or in the gradients (SwAV at init: near-uniform codes, a small loss change)
    loss_gap = abs(accumulated[0]["loss"] - one_batch[0]["loss"]) / abs(one_batch[0]["loss"])
    grad_gap = max((accumulated[0]["grads"][k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                   for k, g in one_batch[0]["grads"].items())
    assert loss_gap > 1e-4 or grad_gap > 1e-2, \
        f"{name} is marked batch_coupled, but 2 micro-batches give the loss and gradients of one batch " \
        f"(relative gaps {loss_gap:.2g}, {grad_gap:.2g})"


def test_micro_batches_see_the_same_state():
    """MoCo v2's queue and SwAV's are taken in ``on_step_end``: the second micro-batch of a step does not see
    the first one's keys among its negatives (it did when the queue was updated inside ``loss``)."""
    m = build("moco_v2", extra_args=SMALL_BATCH["moco_v2"])
    before = m.queue.clone()
    images = torch.randint(0, 256, (2 * B, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for batch in batches(images, captions(2 * B), 0, 2, False):
        m.loss(batch)
    assert torch.equal(m.queue, before)
    m.on_step_end(0, STEPS)
    assert int(m.queue_ptr) == 2 * B and not torch.equal(m.queue[: 2 * B], before[: 2 * B])


def test_trainer_accumulate_2_equals_one_step_at_twice_the_batch(tmp_path):
    """The whole trainer: ``data.batch_size=8, train.accumulate=2`` ends with the weights of
    ``batch_size=16`` (same images per step, same learning rate), for a per-sample method on a network
    without batch norm (a one-block ViT, rotation prediction with a linear head, deterministic views)."""
    from conftest import REPO, SAMPLE

    from sslhub.train.recipe import load_recipe
    from sslhub.train.trainer import train

    common = ["encoder.arch=vit_tiny_patch16_224", "encoder.cifar_stem=false", "encoder.image_size=16",
              "encoder.model_args={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
              f"data.train={SAMPLE}", "data.num_workers=0", "train.max_steps=3", "optim.warmup_epochs=0",
              "eval.knn.test=", "method_args.head_hidden_dim=0",
              "method_args.views={size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, "
              "gray_p: 0.0}"]
    runs = {}
    for name, over in (("accumulated", ["data.batch_size=8", "train.accumulate=2"]),
                       ("one_batch", ["data.batch_size=16", "train.accumulate=1"]),
                       ("half_batch", ["data.batch_size=8", "train.accumulate=1"])):
        recipe = load_recipe(REPO / "recipes/rotation_cifar10.yaml", [*common, *over])
        result = train(recipe, tmp_path / name, progress=False)
        from safetensors.torch import load_file
        runs[name] = load_file(f"{result['export']}/model.safetensors")
        cfg = __import__("json").loads((tmp_path / name / "export/config.json").read_text())
        assert cfg["sslhub"]["global_batch"] == (8 if name == "half_batch" else 16)
    for k, v in runs["one_batch"].items():
        assert torch.allclose(runs["accumulated"][k], v, rtol=1e-4, atol=1e-6), k
    assert any(not torch.allclose(runs["half_batch"][k], v, rtol=1e-4, atol=1e-6) for k, v in runs["one_batch"].items())
