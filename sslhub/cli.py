"""The ``sslhub`` command line.  Every command that computes something prints JSON on its last line.

Examples:
  sslhub methods
  sslhub train recipes/simclr_cifar10.yaml --set train.max_steps=50 --out runs/simclr
  torchrun --nproc_per_node=2 -m sslhub train recipes/simclr_cifar10.yaml     # 2 processes
  sslhub train recipes/simclr_cifar10.yaml --out runs/simclr --resume          # after a crash
  sslhub eval knn --model runs/simclr/export --train data/cifar10-sample --test data/cifar10-sample
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__


def _train(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from .recipe import load_recipe
    from .trainer import train

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    return train(recipe, out, resume=args.resume, progress=not args.no_progress)


def _eval_knn(args: argparse.Namespace) -> dict:
    from .eval.knn import knn_eval
    from .loading import load_encoder

    enc = load_encoder(args.model)
    bank, test = _labelled(enc, args)
    fb, fq = (enc.embed_images(d.images, batch_size=256, normalize=True, progress=True) for d in (bank, test))
    res = knn_eval(fb, bank.labels, fq, test.labels, ks=tuple(args.k), temperature=args.temperature)
    return {"model": args.model, "bank": args.train, "test": args.test, "knn": res}


def _labelled(enc, args):
    """The --train / --test data decoded at the size the encoder's preprocessing resizes from."""
    from .data.images import decode_all
    from .data.sources import open_source

    size = int(enc.image_size / getattr(enc, "crop_pct", 1.0))  # the encoder centre-crops from here
    return tuple(decode_all(open_source(spec, split), size, args.workers, desc=f"decoding {what}")
                 for what, spec, split in (("train", args.train, args.train_split), ("test", args.test, args.test_split)))


def _methods(args: argparse.Namespace) -> dict:
    from .registry import list_methods

    methods = {name: cls.paper for name, cls in list_methods().items()}
    for name, paper in methods.items():
        print(f"{name:12s} {paper}", file=sys.stderr)
    return {"methods": methods}


def _cards(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from .card import card_index

    text = card_index(args.exports, " ".join(["--out", args.out, *args.exports]))
    Path(args.out).write_text(text)
    return {"written": args.out, "checkpoints": len(args.exports)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslhub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sslhub {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe, evaluate it and export the encoder",
                       description="Train RECIPE; the last stdout line is JSON naming the export folder.")
    t.add_argument("recipe", help="recipe YAML, e.g. recipes/simclr_cifar10.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optim.lr=0.1 (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate an encoder")
    esub = e.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted k-NN on frozen features (InstDisc/DINO protocol)",
                        description="Example: sslhub eval knn --model runs/simclr/export "
                                    "--train ../shared/data/cifar10 --test ../shared/data/cifar10")
    k.add_argument("--model", required=True, help="an export folder (or local-dir:PATH)")
    k.add_argument("--train", required=True, help="labelled bank: shards folder, pattern or ImageFolder")
    k.add_argument("--test", required=True, help="labelled queries")
    k.add_argument("--train-split", default="train")
    k.add_argument("--test-split", default="test")
    k.add_argument("--k", type=int, nargs="+", default=[20, 200])
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--workers", type=int, default=2)
    k.set_defaults(func=_eval_knn)

    c = sub.add_parser("cards", help="write MODEL_CARDS.md: the card template and an index of exports",
                       description="Example: sslhub cards --out MODEL_CARDS.md runs/*/export")
    c.add_argument("exports", nargs="*", help="export folders to index")
    c.add_argument("--out", default="MODEL_CARDS.md")
    c.set_defaults(func=_cards)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.sources import DataError
    from .loading import LoadError

    try:
        result = args.func(args)
    except (ConfigError, DataError, LoadError, CheckpointError, FileNotFoundError) as e:
        print(f"sslhub: error: {e}", file=sys.stderr)
        return 2
    if result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
