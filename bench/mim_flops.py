"""FLOPs of masked image modeling (issue 15): MAE's encoder on the visible patches only vs the whole grid, and a
whole MAE training step vs a SimMIM step on the same ViT.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications, convolutions and attention;
element-wise operations are not counted), per image, on the recipes' encoder (recipes/mae_imagenette.yaml and
recipes/simmim_imagenette.yaml: ViT-Tiny/8 with 6 blocks at 64 px, 64 patches) and on a ViT-B/16 at 224 px (the
papers' setting, 196 patches; MAE's paper decoder: 512-d, 8 blocks).  FLOP counts do not depend on the machine.

    python bench/mim_flops.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import update_section  # noqa: E402
from sslhub.methods.base import Batch  # noqa: E402
from sslhub.models import patches as P  # noqa: E402
from sslhub.train.recipe import load_recipe  # noqa: E402
from sslhub.methods.registry import get_method  # noqa: E402

SETTINGS = {
    "ViT-Tiny/8, 6 blocks, 64 px (the recipes)": [],
    "ViT-B/16, 224 px (the papers)": [
        "encoder.arch=vit_base_patch16_224", "encoder.image_size=224", "encoder.model_args={}",
        "method_args.views.size=224"],
}
PAPER_DECODER = ["method_args.decoder_dim=512", "method_args.decoder_depth=8", "method_args.decoder_heads=16"]
BATCH = 4


def count(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops()) / BATCH / 1e9  # GFLOP per image


def build(recipe: str, overrides: list[str]):
    r = load_recipe(REPO / "recipes" / recipe, overrides)
    torch.manual_seed(0)
    m = get_method(r.method).create(r.encoder, r.method_args)
    return m.train(), r.encoder.image_size


def measure(overrides: list[str], big: bool) -> dict:
    mae, size = build("mae_imagenette.yaml", overrides + (PAPER_DECODER if big else []))
    simmim, _ = build("simmim_imagenette.yaml", overrides + (["method_args.mask_patch_size=32"] if big else []))
    imgs = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = mae.eval_images(imgs)
    out = {"patches": mae.n_patches}
    with torch.no_grad():
        out["encoder_full"] = count(lambda: mae.vit.forward_features(x))
        for r in (0.5, 0.75, 0.9):
            mask = P.random_mask(BATCH, mae.n_patches, r, torch.Generator().manual_seed(0))
            out[f"encoder_{r}"] = count(lambda: P.encode_visible(mae.vit, x, mask))
    out["mae_step"] = count(lambda: mae.loss(Batch(imgs, seed=0))["loss"].backward())
    out["simmim_step"] = count(lambda: simmim.loss(Batch(imgs, seed=0))["loss"].backward())
    out["decoder"] = out["mae_step"] / 3 - out["encoder_0.75"]  # forward ≈ a third of forward + backward
    return out


def main() -> None:
    rows = []
    for name, overrides in SETTINGS.items():
        m = measure(overrides, big="224" in name)
        rows.append(
            f"| {name} | {m['patches']} | {m['encoder_full']:.3g} | {m['encoder_0.5']:.3g} "
            f"({m['encoder_0.5'] / m['encoder_full']:.2f}×) | {m['encoder_0.75']:.3g} "
            f"(**{m['encoder_0.75'] / m['encoder_full']:.2f}×**) | {m['encoder_0.9']:.3g} "
            f"({m['encoder_0.9'] / m['encoder_full']:.2f}×) | {m['mae_step']:.3g} | {m['simmim_step']:.3g} | "
            f"**{m['mae_step'] / m['simmim_step']:.2f}×** |")
        print(rows[-1], flush=True)
    body = "\n".join([
        f"Command: `python bench/mim_flops.py`; `torch.utils.flop_counter` (matmuls, convolutions, attention; "
        f"torch {torch.__version__}), GFLOP per image, batch {BATCH}. Encoder columns: forward only, MAE's encoder "
        "(`sslhub.models.patches.encode_visible`) at each masking ratio vs timm's `forward_features` on the whole "
        "grid. Step columns: one training step (forward + backward) of the recipes' MAE (75 % masking; decoder "
        "128-d × 2 blocks for the Tiny, the paper's 512-d × 8 for the B/16) and SimMIM (60 % masked, every patch "
        "encoded; 1x1-conv head).",
        "",
        "| encoder | patches | encoder, no mask | 50 % masked | 75 % masked | 90 % masked | MAE step | SimMIM step | "
        "MAE / SimMIM step |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Reading: the encoder's cost follows its sequence length, the visible patches + the class token: at 75 % "
        "masking 17 of 65 tokens (0.26) cost 0.27× on the Tiny, 50 of 197 (0.25) cost 0.26× on the B/16 (the "
        "attention term, quadratic in the length, is small at these lengths). MAE's step includes its decoder over "
        "all patches, which is why the paper keeps the decoder narrow; SimMIM pays for the whole grid in the encoder "
        "at any ratio. Issue 15's targets — MAE encoder ≤ 0.3× the unmasked one at 75 %, and an MAE step cheaper than "
        "a SimMIM step at the same size — are met at both sizes (also checked by tests/test_mim.py).",
    ])
    update_section(REPO / "BENCHMARKS.md", "mim_flops", "Masked image modeling: FLOPs (issue 15)", body)


if __name__ == "__main__":
    main()
