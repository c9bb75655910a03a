"""Optimisers, learning-rate scaling and the schedule against written-out maths, never against themselves.

References (the formulas are written out below; no reference code is imported or copied):

- LARS as BYOL uses it (deepmind-research ``byol/utils/optimizers.py``: weight decay added to the gradient,
  then the trust ratio, then momentum, then ``-lr``) and SimCLR (``lars_optimizer.py``, classic momentum)::

      d      = g + wd·w                         (weight decay only on adapted tensors)
      trust  = η·‖w‖ / ‖d‖   if ‖w‖ > 0 and ‖d‖ > 0, else 1
      buf    = m·buf + trust·d                  (buf starts at 0)
      w     ← w − lr·buf

  Biases and normalisation parameters (here: tensors with ndim ≤ 1) get neither weight decay nor the trust
  ratio: ``buf = m·buf + g``.  Both SimCLR and BYOL take the norm of the *decayed* gradient, ‖g + wd·w‖; You et
  al. (2017, eq. 6) and lightly/Lightning-Bolts use ‖g‖ + wd·‖w‖ instead (an upper bound), which this library
  does not follow: a test pins the difference.  SimCLR multiplies the lr into the momentum buffer, BYOL (and
  PyTorch's SGD) outside it; the two agree at a constant lr, and this library follows BYOL.
- The schedule (MAE, DINO ``cosine_scheduler``): linear warm-up from ``warmup_start`` over W steps (step W is the
  first at the peak), then ``final + (base − final)·(1 + cos(π·t/(T − W)))/2`` for t = 0 … T − W − 1, so the
  cosine would reach ``final`` one step after the last.
- Learning-rate scaling (Goyal et al. 2017; SimCLR appendix B.1): linear ``lr·B/256``, square root
  ``lr·√(B/256)`` (SimCLR's ``0.075·√B``).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from dist_worker import build
from torch import nn

from sslhub.methods.base import Batch
from sslhub.schedules import cosine_schedule
from sslhub.train.optim import LARS, build_optimizer, param_groups, scaled_lr
from sslhub.train.recipe import OptimConfig
from sslhub.train.trainer import accumulate_gradients, apply_update

F32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------ references
def lars_reference(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, lr: float, wd: float, eta: float,
                   momentum: float, adapt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One LARS step on one tensor, in float64, as written out in the module docstring."""
    w, g = w.double(), g.double()
    if adapt:
        d = g + wd * w
        w_norm, d_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
        trust = eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
        d = trust * d
    else:
        d = g
    buf = d if buf is None else momentum * buf + d
    return w - lr * buf, buf


def assert_step(name: str, before: torch.Tensor, after: torch.Tensor, want_delta: torch.Tensor) -> None:
    """``after − before == want_delta`` elementwise, up to the float32 rounding of ``before + Δ`` (a few ulps of
    the weight) and 1e-4 of the step itself."""
    got = after.double() - before.double()
    want = want_delta.double()
    tol = 4 * F32 * before.double().abs() + 1e-4 * want.abs() + 1e-30
    bad = (got - want).abs() > tol
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max |Δ got − Δ want| "
                                 f"{(got - want).abs().max():.3g}, max |Δ want| {want.abs().max():.3g}")


def tiny_net() -> nn.Module:
    """Every kind of tensor the decay rule sorts: kernels (4-D), matrices, biases, BN and LN scales/shifts."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.LayerNorm(5), nn.Linear(5, 2, bias=False))


EXEMPT = {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"}  # biases and norm layers
DECAYED = {"0.weight", "3.weight", "5.weight"}


# ------------------------------------------------------------------------------------------ LARS by hand
def test_lars_first_step_by_hand():
    """w = (3, 4), g = (−1.5, 3), wd = 0.5 → d = g + wd·w = (0, 5); ‖w‖ = ‖d‖ = 5 → trust = η = 0.001;
    lr = 2 → w ← (3, 4) − 2·0.001·(0, 5) = (3, 3.99)."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    opt = LARS([w], lr=2.0, momentum=0.9, weight_decay=0.5, trust_coefficient=0.001)
    w.grad = torch.tensor([[-1.5, 3.0]], dtype=torch.float64)
    opt.step()
    assert w.detach()[0].tolist() == pytest.approx([3.0, 3.99], rel=1e-9, abs=1e-12)
    # You et al.'s trust ratio η‖w‖/(‖g‖ + wd‖w‖) would give 0.001·5/(√11.25 + 2.5) ≈ 8.54e-4, w₂ ≈ 3.99146
    assert abs(w.detach()[0, 1].item() - 3.99146) > 1e-3


def test_lars_two_steps_with_momentum_and_a_new_lr():
    """Two steps of the written-out update on a 3 × 4 tensor; the lr changes between the steps as the trainer's
    schedule does, and multiplies the whole buffer (BYOL, PyTorch), not only the newest gradient."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    w = nn.Parameter(w0.clone())
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    ref, buf = w0.clone(), None
    for lr, g in zip((0.5, 0.2), grads):
        opt.param_groups[0]["lr"] = lr
        w.grad = g.clone()
        opt.step()
        ref, buf = lars_reference(ref, g, buf, lr, 0.1, 0.02, 0.9, adapt=True)
        assert torch.allclose(w.detach(), ref, rtol=1e-9, atol=1e-12), (w.detach() - ref).abs().max()
    assert (w.detach() - w0).abs().max() > 1e-3  # the steps were large enough to see


def test_lars_descends():
    """The update goes against the gradient: ⟨Δw, g⟩ < 0 (wd 0, so d = g)."""
    gen = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    g = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    before = w.detach().clone()
    opt = LARS([w], lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001)
    w.grad = g.clone()
    opt.step()
    delta = w.detach() - before
    assert float((delta * g).sum()) < 0
    # the step's length is lr·η·‖w‖ (‖trust·g‖ = η‖w‖): the trust ratio makes it independent of ‖g‖
    assert float(delta.norm()) == pytest.approx(1.0 * 0.001 * float(before.norm()), rel=1e-6)


def test_lars_trust_ratio_edge_cases():
    """‖w‖ = 0 → trust 1 (SimCLR, BYOL): a plain step −lr·g.  g = 0 with weight decay → d = wd·w, trust = η/wd:
    the step is −lr·η·w whatever wd is."""
    w = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    g = torch.arange(6, dtype=torch.float64).view(2, 3)
    opt = LARS([w], lr=0.3, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(w.detach(), -0.3 * g, rtol=1e-12, atol=0)

    w0 = torch.arange(1, 7, dtype=torch.float64).view(2, 3)
    for wd in (1e-4, 0.5):
        w = nn.Parameter(w0.clone())
        opt = LARS([w], lr=0.3, momentum=0.9, weight_decay=wd, trust_coefficient=0.001)
        w.grad = torch.zeros_like(w0)
        opt.step()
        assert torch.allclose(w.detach() - w0, -0.3 * 0.001 * w0, rtol=1e-4, atol=0)  # ε = 1e-8 next to ‖d‖


def test_lars_exempts_biases_and_norm_layers_from_weight_decay_and_trust_ratio():
    """Through ``build_optimizer``: 1-D tensors take ``w − lr·buf`` with ``buf = m·buf + g`` (no wd, no trust
    ratio), weight tensors the full update; two steps, so the momentum buffer counts too."""
    net = tiny_net().double()
    named = dict(net.named_parameters())
    assert {n for n, p in named.items() if p.ndim <= 1} == EXEMPT and set(named) == EXEMPT | DECAYED
    cfg = OptimConfig(name="lars", lr=0.4, weight_decay=0.05, momentum=0.9, trust_coefficient=0.01)
    opt = build_optimizer(list(net.parameters()), cfg, lr=0.4)
    gen = torch.Generator().manual_seed(3)
    ref = {n: (p.detach().clone(), None) for n, p in named.items()}
    for _ in range(2):
        for n, p in named.items():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            ref[n] = lars_reference(ref[n][0], p.grad, ref[n][1], 0.4, 0.05, 0.01, 0.9, adapt=n in DECAYED)
        opt.step()
        for n, p in named.items():
            assert torch.allclose(p.detach(), ref[n][0], rtol=1e-9, atol=1e-12), n


def test_lars_step_runs_a_closure():
    """``step(closure)`` as PyTorch's optimisers: the closure's backward runs with autograd on (it raised under
    the step's ``no_grad``), its loss is returned and its gradient is the one applied."""
    w0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.01)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum() / 2  # g = w
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == pytest.approx(float((w0 ** 2).sum()) / 2)
    want, _ = lars_reference(w0, w0, None, 0.1, 0.0, 0.01, 0.9, adapt=True)  # = w0·(1 − 0.1·0.01)
    assert torch.allclose(w.detach(), want, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------------ AdamW / SGD decay
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_exemptions(name):
    """Zero gradients isolate the weight decay: SGD's first step is ``−lr·wd·w`` (d = g + wd·w, buf = d), AdamW's
    ``−lr·wd·w`` (decoupled; its Adam part is m̂/(√v̂ + ε) = 0).  Biases, BN/LN parameters and scalars (CLIP's
    ``logit_scale``) do not move; kernels, matrices and 3-D tensors (ViT tokens, as DINO decides) decay."""
    net = tiny_net()
    net.logit_scale = nn.Parameter(torch.tensor(2.5))  # 0-D: exempt
    net.cls_token = nn.Parameter(torch.full((1, 1, 5), 0.7))  # 3-D: decayed
    lr, wd = 0.1, 0.05
    cfg = OptimConfig(name=name, lr=lr, weight_decay=wd, momentum=0.9)
    opt = build_optimizer(list(net.parameters()), cfg, lr=lr)
    named = dict(net.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in named.items():
        want = torch.zeros_like(p) if n in EXEMPT | {"logit_scale"} else -lr * wd * before[n]
        assert_step(f"{name} {n}", before[n], p.detach(), want)
    assert any((p.detach() != before[n]).any() for n, p in named.items())


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sgd_and_adamw_first_step_with_gradients(name):
    """Gradients and decay together.  SGD: ``Δ = −lr·(g + wd·w)`` (exempt: ``−lr·g``).  AdamW's first step:
    ``Δ = −lr·wd·w − lr·g/(|g| + ε)`` (m̂ = g, v̂ = g² after bias correction; exempt: no decay term)."""
    net = tiny_net()
    lr, wd = 0.01, 0.05
    opt = build_optimizer(list(net.parameters()), OptimConfig(name=name, lr=lr, weight_decay=wd), lr=lr)
    named = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(4)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.randn(p.shape, generator=gen)
    grads = {n: p.grad.clone() for n, p in named.items()}
    opt.step()
    for n, p in named.items():
        decay = 0.0 if n in EXEMPT else wd
        g, w = grads[n].double(), before[n].double()
        want = -lr * (g + decay * w) if name == "sgd" else -lr * decay * w - lr * g / (g.abs() + 1e-8)
        assert_step(f"{name} {n}", before[n], p.detach(), want)


def test_param_groups_split():
    net = tiny_net()
    ids = {id(p): n for n, p in net.named_parameters()}
    groups = param_groups(list(net.parameters()), 0.3)
    by_wd = {g["weight_decay"]: {ids[id(p)] for p in g["params"]} for g in groups}
    assert by_wd == {0.3: DECAYED, 0.0: EXEMPT}


# ------------------------------------------------------------------------------------------ schedule
def dino_cosine(base: float, final: float, total: int, warmup: int, start: float = 0.0) -> list[float]:
    """The schedule written out step by step (see the module docstring)."""
    out = []
    for s in range(total):
        if s < warmup:
            out.append(start + (base - start) * s / warmup)
        else:
            t, span = s - warmup, total - warmup
            out.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / span)))
    return out


def test_cosine_schedule_end_points():
    base, final, total, warmup = 0.8, 0.05, 110, 10
    s = cosine_schedule(base, final, total, warmup)
    assert len(s) == total
    assert s[0] == 0.0  # warm-up starts at 0 (MAE, DINO)
    assert s[warmup // 2] == pytest.approx(base / 2, rel=1e-12)  # halfway up the linear warm-up
    assert s[warmup] == pytest.approx(base, rel=1e-12)  # the end of warm-up is the peak …
    assert s.max() == pytest.approx(base, rel=1e-12) and int(np.argmax(s)) == warmup  # … and nothing is above it
    assert s[warmup + (total - warmup) // 2] == pytest.approx((base + final) / 2, rel=1e-12)  # cosine midpoint
    # the last step: π·99/100 along the cosine, within (base − final)·π²/(4·span²) above final
    span = total - warmup
    assert s[-1] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (span - 1) / span)),
                                  rel=1e-12)
    assert final < s[-1] <= final + (base - final) * math.pi**2 / (4 * span**2)
    assert np.all(np.diff(s[:warmup + 1]) > 0)  # warm-up rises …
    assert np.all(np.diff(s[warmup:]) < 0)  # … the cosine falls every step, and never below final
    assert np.all(s[warmup:] > final)
    assert s.tolist() == pytest.approx(dino_cosine(base, final, total, warmup), rel=1e-12, abs=1e-15)


def test_cosine_schedule_long_run_ends_at_min_lr():
    s = cosine_schedule(1.0, 0.01, 20_000, 500)
    assert s[-1] == pytest.approx(0.01, abs=1e-7) and s[500] == 1.0 and s[0] == 0.0


@pytest.mark.parametrize("total,warmup,start", [(7, 0, 0.0), (9, 3, 0.1), (5, 1, 0.0), (4, 4, 0.0), (3, 10, 0.0)])
def test_cosine_schedule_shapes(total, warmup, start):
    """No warm-up starts at the peak; a warm-up as long as the run (or longer) is all warm-up."""
    s = cosine_schedule(2.0, 0.5, total, warmup, warmup_start=start)
    assert s.tolist() == pytest.approx(dino_cosine(2.0, 0.5, total, min(warmup, total), start), rel=1e-12)
    if warmup == 0:
        assert s[0] == 2.0
    assert cosine_schedule(0.3, 0.3, 10, 0).tolist() == pytest.approx([0.3] * 10)


# ------------------------------------------------------------------------------------------ lr scaling
@pytest.mark.parametrize("rule,lr,batch,want", [
    ("linear", 0.3, 4096, 4.8),  # SimCLR: 0.3 × 4096/256
    ("linear", 0.3, 256, 0.3),
    ("linear", 0.2, 128, 0.1),  # RotNet: 0.1 at batch 128
    ("sqrt", 1.2, 4096, 4.8),  # SimCLR's square-root rule 0.075·√4096 = 4.8
    ("sqrt", 0.5, 64, 0.25),
    ("none", 0.05, 4096, 0.05),
])
def test_scaled_lr(rule, lr, batch, want):
    assert scaled_lr(OptimConfig(lr=lr, lr_scaling=rule), batch) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------ one trainer step
def images(seed: int = 0, n: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def batch(x: torch.Tensor, step: int = 0) -> Batch:
    return Batch(x, rng=torch.Generator().manual_seed(100 + step), step=step)


def test_one_sgd_step_moves_every_weight_by_minus_lr_times_its_gradient(tmp_path):
    """A registry method (SimCLR, tiny ResNet with batch norm) and the trainer's own step functions with plain
    SGD from ``build_optimizer`` (momentum 0, wd 0): every parameter moves by exactly −lr·g, and on the same
    batch the loss falls by about lr·‖g‖² (first order) for a small lr."""
    method = build("simclr", tmp_path)
    method.train()
    groups = method.optim_groups()
    params = [p for p in method.parameters() if p.requires_grad]
    named = {n: p for n, p in method.named_parameters() if p.requires_grad}
    lr = 2e-4
    cfg = OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0)
    opts = {k: build_optimizer(ps, cfg, lr) for k, ps in groups.items()}
    x = images()
    loss0 = accumulate_gradients(method, groups, [batch(x)])["loss"]
    grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
    assert len(grads) > 0.9 * len(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    apply_update(method, opts, params, 0, 10)
    moved = 0
    for n, p in named.items():
        want = -lr * grads[n] if n in grads else torch.zeros_like(p)
        assert_step(n, before[n], p.detach(), want)
        moved += int((p.detach() != before[n]).any())
    assert moved == len(grads)
    with torch.no_grad():
        loss1 = float(method.loss(batch(x))["loss"])
    g2 = sum(float((g.double() ** 2).sum()) for g in grads.values())
    assert loss1 < loss0
    assert (loss0 - loss1) == pytest.approx(lr * g2, rel=0.25), (loss0, loss1, lr * g2)


def test_one_lars_step_through_the_trainer_equals_the_formula(tmp_path):
    """The same method with LARS from ``build_optimizer`` (wd, momentum, η from the recipe), two steps through
    the trainer's functions: every tensor follows the written-out update; BN and biases are not adapted."""
    method = build("simclr", tmp_path)
    method.train()
    groups = method.optim_groups()
    params = [p for p in method.parameters() if p.requires_grad]
    named = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert any(p.ndim == 1 for p in named.values()) and any(p.ndim > 1 for p in named.values())
    lr, wd, eta, m = 0.6, 0.02, 0.001, 0.9
    cfg = OptimConfig(name="lars", lr=lr, weight_decay=wd, momentum=m, trust_coefficient=eta)
    opts = {k: build_optimizer(ps, cfg, lr) for k, ps in groups.items()}
    bufs: dict[str, torch.Tensor | None] = {n: None for n in named}
    for step in range(2):
        accumulate_gradients(method, groups, [batch(images(step), step)])
        grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        before = {n: p.detach().clone() for n, p in named.items()}
        apply_update(method, opts, params, step, 10)
        for n, g in grads.items():
            want, bufs[n] = lars_reference(before[n], g, bufs[n], lr, wd, eta, m, adapt=before[n].ndim > 1)
            assert_step(f"step {step} {n}", before[n], named[n].detach(), want - before[n].double())


def test_trainer_step_uses_the_scaled_and_scheduled_lr(tmp_path):
    """``Trainer.train_step``: with plain SGD each weight moves by −lr(step)·g, where lr(step) is the recipe's
    lr × batch/256 along the written-out warm-up + cosine — so a schedule of zeros, or a trainer that does not
    set the lr, fails here."""
    from conftest import REPO, SAMPLE

    from sslhub.train.recipe import load_recipe
    from sslhub.train.trainer import Trainer

    total, base_lr, batch_size = 12, 0.4, 16
    recipe = load_recipe(REPO / "recipes/rotation_cifar10.yaml", [
        "encoder.arch=vit_tiny_patch16_224", "encoder.cifar_stem=false", "encoder.image_size=16",
        "encoder.model_args={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", f"data.train={SAMPLE}",
        "data.num_workers=0", f"data.batch_size={batch_size}", f"train.max_steps={total}", "eval.knn.test=",
        "method_args.head_hidden_dim=0", "train.channels_last=false",
        ("method_args.views={size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, "
         "gray_p: 0.0}"),
        "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", f"optim.lr={base_lr}",
        "optim.lr_scaling=linear", "optim.min_lr_ratio=0.1", "optim.warmup_epochs=0.07"])
    t = Trainer(recipe, tmp_path / "run", progress=False)
    t.setup()
    t.method.train()
    warmup = int(0.07 * t.plan.steps_per_epoch)
    assert 2 <= warmup < total - 2
    peak = base_lr * batch_size / 256
    lrs = dino_cosine(peak, 0.1 * peak, total, warmup)
    named = {n: p for n, p in t.method.named_parameters() if p.requires_grad}
    for step in (warmup // 2, warmup, total - 1):
        twin = copy.deepcopy(t.method)
        twin_named = dict(twin.named_parameters())
        for b in t.micro_batches(step):
            twin.loss(b)["loss"].backward()
        before = {n: p.detach().clone() for n, p in named.items()}
        t.train_step(step)
        for n, p in named.items():
            g = twin_named[n].grad
            want = -lrs[step] * g if g is not None else torch.zeros_like(p)
            assert_step(f"step {step} {n}", before[n], p.detach(), want)
        assert any((p.detach() != before[n]).any() for n, p in named.items())
