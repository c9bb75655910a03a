"""Reconstructions of held-out images by a masked-modeling export (MAE, SimMIM), for the README: original | masked |
reconstruction | reconstruction + visible, as the run folder's ``reconstructions.png`` but on chosen data.

    python bench/reconstruction_figure.py --model bench/out/mim_imagenette/table/seed0/mae/export \
        --data ../shared/data/imagenette96 --split val --out bench/figures/mae_reconstructions.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslhub.data.images import decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.methods.mim import PICTURE, load_masked_model  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/imagenette96-sample")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--stride", type=int, default=397, help="every stride-th image (several classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench/figures/mae_reconstructions.png"))
    args = p.parse_args(argv)
    method = load_masked_model(args.model)
    test = decode_all(open_source(args.data, args.split), method.backbone.cfg.image_size, progress=False)
    images = test.images[:: args.stride][: args.n]
    png, caption = method.pictures(images, f"held-out images ({args.split})", seed=args.seed)[PICTURE]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(png)
    print(f"{args.out}: {caption}")


if __name__ == "__main__":
    main()
