"""Run by tests/test_distributed.py under torchrun: two steps of a method on this rank's slice.

Two optimiser steps with ``on_step_end`` between them, so state that crosses processes (queues,
centres, EMA targets, Sinkhorn sums, BN statistics) is checked too, not only the first loss.  The gradients
are kept per parameter tensor and compared with a tolerance scaled to that tensor; normalisation weights
that timm initialises to zero (the last BN of each residual branch) start at 1 here, so every residual
convolution has a gradient worth comparing from the first step.

Every ``nn.ReLU`` of the network is a softplus here: the comparison is of derivatives, and a ReLU whose input
lies within float32 rounding of 0 has a derivative (0 or 1) that the order of the sums decides.  That happened
to BYOL's second step: one pre-activation of ``layer1.0`` is +4.5e-7 in float64, +1.2e-7 in two processes and
−1.2e-7 in one (two BN outputs of ±1.0554 cancelling), so one process dropped that element's gradient and its
step-1 gradients were 2 % off the float64 ones, the two processes' 4e-5.  With a smooth activation the
float32 rounding moves the gradients in proportion, and the per-tensor tolerance keeps its meaning.
"""
import dataclasses
import sys

import torch

import sslhub.distributed as D
from sslhub.data.augment import ViewConfig
from sslhub.methods.base import Batch
from sslhub.methods.registry import get_method
from sslhub.train.recipe import recipe_from_dict

STEPS = 2
SHRINK = {"n_prototypes": 32, "queue_size": 64}  # sizes that are not called *_dim
DETERMINISTIC_VIEWS = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0,
                       "blur_p": 0.0, "solarize_p": 0.0}
# variants of a method tested on their own: name → (method, method_args)
VARIANTS = {"clip-global-loss": ("clip", {"local_loss": False})}
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def build(name: str, workdir: str = ".", extra_args: dict | None = None):
    import json
    from pathlib import Path

    method, args = VARIANTS.get(name, (name, {}))
    encoder = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}
    if get_method(method).needs_vit:  # masked modeling: a one-block ViT, 4-px patches (a 4x4 grid)
        from conftest import TINY_VIT_ENCODER

        encoder = TINY_VIT_ENCODER
    if get_method(method).needs_text:  # an image–text method: a one-layer CLIP from a JSON config
        (Path(workdir) / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
        encoder = {"arch": str(Path(workdir) / "tiny-clip.json"), "image_size": 16}
    cls = get_method(method)
    views = {}  # every view of the method (global, second, local crops …) made deterministic: 16 px, local 8 px
    for f in dataclasses.fields(cls.Config):
        if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), ViewConfig):
            views[f.name] = {"size": 8 if "local" in f.name else 16, **DETERMINISTIC_VIEWS}
    small = {}  # the papers' head widths (8192, 65536 outputs …) cost minutes here: the maths is the same at 64
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, int) and (f.name.endswith("_dim") or f.name in SHRINK) and default > 64:
            small[f.name] = SHRINK.get(f.name, 64)
    r = recipe_from_dict({"method": method, "encoder": encoder, "method_args": {**small, **args, **views, **(extra_args or {})}})
    torch.manual_seed(0)
    m = cls.create(r.encoder, r.method_args)
    for mod in m.modules():  # zero-initialised norm weights would zero their branch's gradients at step 0
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and w is not None and not w.detach().any():
            torch.nn.init.ones_(w)
    smooth_activations(m)
    m.configure(steps_per_epoch=1, max_steps=STEPS)
    if D.is_dist():
        m.convert_batchnorm()
    return m


def smooth_activations(module: torch.nn.Module) -> None:
    """Every ``nn.ReLU`` in ``module`` (online, target and teacher copies alike) becomes ``nn.Softplus``."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, torch.nn.Softplus())
        else:
            smooth_activations(child)


def captions(n: int) -> list[str]:
    """Captions of different lengths, one per image."""
    return [f"a photo of {' and '.join(['thing'] * (1 + i % 3))} number {i}" for i in range(n)]


def assert_grads_close(g: dict[str, torch.Tensor], g1: dict[str, torch.Tensor], step: int) -> None:
    """P processes' averaged gradients vs one process's (both before clipping), tensor by tensor: the float32
    rounding of a summed element scales with the largest gradient of its tensor, so the tolerance is 3e-4 of
    that (a missing gather, a gradient off by the number of processes, a rank's batch dropped: ≥ 10 %).  The
    rounding grows step by step: SwAV's queue test measured 1.01e-4 at its 4th step on one of the project's
    machines (an AMD EPYC; 1e-4 had passed on others), so 3e-4 leaves room and stays 300× below the bugs.
    A gradient that is zero in exact arithmetic (the bias of a layer followed by batch norm) is float32 noise of
    the size of the whole model's gradients: the tolerance never goes below 1e-6 of the largest of those."""
    assert g.keys() == g1.keys()
    floor = 1e-6 * max(want.abs().max().item() for want in g1.values())
    for name, want in g1.items():
        scale = want.abs().max().item()
        diff = (g[name] - want).abs().max().item()
        assert diff <= max(3e-4 * scale, floor, 1e-12), \
            f"step {step}, {name}: max grad diff {diff:.3g}, the gradient's {scale:.3g}"


def run(method, images, texts=None) -> dict[str, torch.Tensor]:
    """STEPS steps of SGD; returns each step's process-averaged loss and gradients and the final state."""
    texts = texts if texts is not None else captions(images.shape[0])
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=0.05)
    result = {}
    for s in range(STEPS):
        out = method.loss(Batch(images, texts=texts if method.needs_text else None,
                                rng=torch.Generator().manual_seed(s), step=s))
        out["loss"].backward()
        D.average_gradients(params)
        # recorded before clipping, so a gradient off by a common factor (e.g. 1/processes) still shows
        for n, p in named:
            result[f"grad{s}.{n}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        # unit-norm steps: large early gradients (Barlow Twins, VICReg) would throw SGD to weights where the
        # float32 rounding of the two runs diverges; every process clips by the same global norm
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        result[f"loss{s}"] = D.all_reduce_mean(out["loss"].detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(s, STEPS)
    for k, v in method.state_dict().items():
        if v.is_floating_point():
            result[f"state.{k}"] = v
    return result


if __name__ == "__main__":
    name, out_dir = sys.argv[1], sys.argv[2]
    D.init_from_env()
    images = torch.load(f"{out_dir}/images.pt", weights_only=True)
    b = images.shape[0] // D.world_size()
    mine = images[D.rank() * b : (D.rank() + 1) * b]
    result = run(build(name, out_dir), mine, captions(images.shape[0])[D.rank() * b : (D.rank() + 1) * b])
    torch.save(result, f"{out_dir}/rank{D.rank()}.pt")
