"""A trained method's own pictures (``Method.pictures``) of chosen held-out images, from its run folder.

The export holds the encoder alone; the pretext heads a picture needs (relative position's pair classifier,
jigsaw's permutation classifier, MAE's decoder …) are in the run's newest checkpoint, which this rebuilds with the
run's own recipe.  For the README's figures of the patch-context tasks:

    python bench/method_pictures.py --run bench/out/methods_cifar10/runs/seed0/relative_position \
        --out bench/figures/relative_position_pairs.png
    python bench/method_pictures.py --run bench/out/methods_cifar10/runs/seed0/jigsaw --out bench/figures/jigsaw_puzzles.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslhub import formats  # noqa: E402
from sslhub.data.images import decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.methods.registry import get_method  # noqa: E402
from sslhub.train.checkpoint import list_checkpoints, load_state  # noqa: E402
from sslhub.train.recipe import recipe_from_dict  # noqa: E402


def load_method(run: Path):
    """The method of run folder ``run`` with the weights of its newest checkpoint, in eval mode."""
    recipe = recipe_from_dict(json.loads((run / formats.RUN_RECIPE).read_text()), str(run / formats.RUN_RECIPE))
    ckpts = list_checkpoints(run / formats.RUN_CHECKPOINTS)
    if not ckpts:
        raise SystemExit(f"{run / formats.RUN_CHECKPOINTS}: no checkpoint to rebuild the method from")
    method = get_method(recipe.method).create(recipe.encoder, recipe.method_args)
    method.load_state_dict(load_state(ckpts[0])["model"])
    return method.eval(), recipe


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a run folder (recipe.json + checkpoints/)")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--stride", type=int, default=997, help="every stride-th image (several classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    method, recipe = load_method(args.run)
    test = decode_all(open_source(args.data, args.split), recipe.encoder.image_size, progress=False)
    images = test.images[:: args.stride][: args.n]
    with torch.no_grad():
        pictures = method.pictures(images, f"held-out images ({args.split})", seed=args.seed)
    if not pictures:
        raise SystemExit(f"{recipe.method} draws no pictures")
    png, caption = next(iter(pictures.values()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"{args.out}: {caption}")


if __name__ == "__main__":
    main()
