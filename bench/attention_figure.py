"""A figure of a ViT export's last-layer [CLS] attention (DINO, Caron et al. 2021, Fig. 1), next to the same ViT at
random init: held-out images, the mean-of-heads map and each head's map, through ``sslhub.inference.attention``
(what the demo's attention tab shows).

    python bench/attention_figure.py --model bench/out/mim_imagenette/table/seed0/dino_ViT/export \
        --data ../shared/data/imagenette96 --split val --out bench/figures/dino_vit_attention.png
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslhub import load_encoder  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.inference.attention import attention_heads, input_region, overlay  # noqa: E402


def held_out(data: str, split: str, n: int, stride: int):
    """Every ``stride``-th image of the split (several classes), as PIL images."""
    from PIL import Image

    out = []
    for i, sample in enumerate(open_source(data, split).samples):
        if i % stride == 0:
            out.append(Image.open(io.BytesIO(sample.data) if sample.data is not None else sample.path).convert("RGB"))
        if len(out) == n:
            break
    return out


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--random", default=None, help="the same ViT at random init (an export), shown as a last row")
    p.add_argument("--data", default="data/imagenette96-sample")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--stride", type=int, default=397)
    p.add_argument("--out", default=str(REPO / "bench/figures/dino_vit_attention.png"))
    args = p.parse_args(argv)
    images = held_out(args.data, args.split, args.n, args.stride)
    models = [("trained", load_encoder(args.model))]
    if args.random:
        models.append(("random init", load_encoder(args.random)))
    heads = attention_heads(models[0][1], images[0]).shape[0]
    cols = 2 + heads
    rows = len(images) * len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    r = 0
    for img in images:
        for label, enc in models:
            region = input_region(enc, img)
            maps = attention_heads(enc, img)
            panels = [region, overlay(region, maps.mean(0))] + [overlay(region, m) for m in maps]
            titles = ["input", f"mean ({label})"] + [f"head {h + 1}" for h in range(len(maps))]
            for c, (panel, title) in enumerate(zip(panels, titles)):
                ax = axes[r, c]
                ax.imshow(np.asarray(panel))
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 or (len(models) > 1 and c == 1):
                    ax.set_title(title, fontsize=7)
            r += 1
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(args.out)


if __name__ == "__main__":
    main()
