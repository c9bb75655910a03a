"""The ``sslhub`` command line.  Every command that computes something prints JSON on its last line.

Examples:
  sslhub methods
  sslhub train recipes/simclr_cifar10.yaml --set train.max_steps=50 --out runs/simclr
  torchrun --nproc_per_node=2 -m sslhub train recipes/simclr_cifar10.yaml     # 2 processes
  sslhub train recipes/simclr_cifar10.yaml --out runs/simclr --resume          # after a crash
  sslhub eval knn --model runs/simclr/export --train data/cifar10-sample --test data/cifar10-sample
  sslhub eval linear --model runs/simclr/export --train DATA --test DATA --low-shot 0.01 0.1
  sslhub eval zeroshot --model OPEN_CLIP_FOLDER --test ../shared/data/cifar10 --templates cifar
  sslhub eval retrieval --model OPEN_CLIP_FOLDER --data ../shared/data/flickr8k --split test
  sslhub embed --model runs/simclr/export --data ../shared/data/cifar10 --out runs/emb   # resumable shards
  sslhub index build --model M --data DATA --out runs/index && sslhub index search --index runs/index --text "a dog"
  sslhub demo OPEN_CLIP_FOLDER --data data/flickr8k-sample          # Gradio demo on http://127.0.0.1:7860
  sslhub push runs/simclr/export my-org/simclr-r18 --private      # then load_encoder("hf-hub:my-org/simclr-r18")
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Callable

from sslhub._version import __version__
from sslhub.errors import SslhubError

# What the commands do, imported when one runs: parsing (--help, a usage error) stays free of torch
COMMANDS = "sslhub.apps.commands"
RECIPES = "sslhub.train.recipe"  # torch-free: a recipe's top level is checked before anything heavy is imported


def _command(name: str) -> Callable[[argparse.Namespace], dict | None]:
    """``sslhub.apps.commands.<name>``, imported on the first call."""

    def run(args: argparse.Namespace) -> dict | None:
        return getattr(importlib.import_module(COMMANDS), name)(args)

    run.__name__ = run.__qualname__ = name
    return run


def _train(args: argparse.Namespace) -> dict | None:
    """The recipe is read and checked before the trainer (torch) is imported: an error in its top level (data,
    optim, train, eval, encoder) is reported in well under a second."""
    recipe = importlib.import_module(RECIPES).load_recipe(args.recipe, args.set)
    return importlib.import_module(COMMANDS).train(args, recipe)


def _data_args(p: argparse.ArgumentParser, train: bool = True) -> None:
    if train:
        p.add_argument("--train", required=True, help="labelled training data: shards folder, pattern or ImageFolder")
        p.add_argument("--train-split", default="train")
    p.add_argument("--test", required=True, help="labelled test data")
    p.add_argument("--test-split", default="test")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")


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
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, an existing run is never overwritten)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate an encoder (JSON metrics on stdout)")
    esub = e.add_subparsers(dest="protocol", required=True)
    model_help = "an export folder, local-dir:PATH, hf-hub:ORG/NAME[@REV], timm:NAME or open_clip:ARCH/TAG"
    k = esub.add_parser("knn", help="weighted k-NN on frozen features (InstDisc/DINO protocol)",
                        description="Example: sslhub eval knn --model runs/simclr/export "
                                    "--train ../shared/data/cifar10 --test ../shared/data/cifar10")
    k.add_argument("--model", required=True, help=model_help)
    _data_args(k)
    k.add_argument("--k", type=int, nargs="+", default=[20, 200])
    k.add_argument("--temperature", type=float, default=0.07)
    k.set_defaults(func=_command("eval_knn"))

    lin = esub.add_parser("linear", help="logistic-regression probe (C chosen on held-out train), low-shot, fine-tune",
                          description="Example: sslhub eval linear --model runs/simclr/export --train "
                                      "../shared/data/cifar10 --test ../shared/data/cifar10 --low-shot 0.01 0.1")
    lin.add_argument("--model", required=True, help=model_help)
    _data_args(lin)
    lin.add_argument("--low-shot", type=float, nargs="*", default=[], help="label fractions, e.g. 0.01 0.1")
    lin.add_argument("--finetune-epochs", type=float, default=0, help="also fine-tune all layers (sslhub exports)")
    lin.add_argument("--finetune-lr", type=float, default=1e-3)
    lin.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75 for ViTs")
    lin.set_defaults(func=_command("eval_linear"))

    z = esub.add_parser("zeroshot", help="zero-shot classification with prompt templates",
                        description="Example: sslhub eval zeroshot --model OPEN_CLIP_FOLDER "
                                    "--test ../shared/data/cifar10 --templates cifar")
    z.add_argument("--model", required=True, help=model_help)
    _data_args(z, train=False)
    z.add_argument("--classes", help="comma-separated names or a file (default: the data's dataset.json classes)")
    z.add_argument("--templates", default="default",
                   help="default | imagenet | imagenet-simple | cifar | a file with one template per line")
    z.set_defaults(func=_command("eval_zeroshot"))

    r = esub.add_parser("retrieval", help="image↔text recall@k (Flickr8k/COCO protocol)",
                        description="Example: sslhub eval retrieval --model OPEN_CLIP_FOLDER "
                                    "--data ../shared/data/flickr8k --split test")
    r.add_argument("--model", required=True, help=model_help)
    r.add_argument("--data", required=True, help="shards with an image and its captions (.json 'captions' or .txt)")
    r.add_argument("--split", default="test")
    r.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    r.add_argument("--workers", type=int, default=2)
    r.set_defaults(func=_command("eval_retrieval"))

    ix = sub.add_parser("index", help="build and search FAISS indexes of image embeddings")
    isub = ix.add_subparsers(dest="action", required=True)
    b = isub.add_parser("build", help="save an index of a data set (embedded now) or of saved embeddings",
                        description="Examples: sslhub index build --model runs/simclr/export "
                                    "--data data/cifar10-sample --out runs/index; sslhub index build --embeddings "
                                    "runs/emb --out runs/index --memory-budget-mb 4096 (from `sslhub embed`; "
                                    "beyond the budget an IVF-PQ index whose lists stay on disk, memory-mapped)")
    b.add_argument("--model", help=model_help + " (with --data)")
    b.add_argument("--data", help="images to embed now (with --model)")
    b.add_argument("--split", default="train")
    b.add_argument("--embeddings", metavar="EMB", help="an embeddings folder written by `sslhub embed` "
                   "(instead of --model/--data)")
    b.add_argument("--memory-budget-mb", type=float, default=4096,
                   help="RAM the build may use (--embeddings): vectors whose float32 copy ×2 exceeds it are "
                        "indexed on disk (default 4096)")
    b.add_argument("--out", required=True, help="index folder (written atomically)")
    b.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq", "ondisk"],
                   help="ondisk (--embeddings only): force the on-disk IVF-PQ index")
    b.add_argument("--refine", type=int, default=10,
                   help="on disk: searches re-rank k×REFINE PQ candidates by exact scores against the embeddings "
                        "folder's vectors (memory-mapped; 0: codes only; default 10)")
    b.add_argument("--workers", type=int, default=2)
    b.set_defaults(func=_command("index_build"))
    s = isub.add_parser("search", help="query an index with text or images",
                        description='Example: sslhub index search --index runs/index --image cat.jpg --k 5')
    s.add_argument("--index", required=True)
    s.add_argument("--model", help="default: the model recorded in the index")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", nargs="+", help="text queries (needs a text tower)")
    q.add_argument("--image", nargs="+", help="image files")
    s.add_argument("--k", type=int, default=10)
    s.set_defaults(func=_command("index_search"))

    em = sub.add_parser("embed", help="embed a data set into resumable embedding shards (1 process or torchrun)",
                        description="Each process embeds its own data shards (shard i: process i mod world size) into "
                                    "OUT/NNNNN.npy + .jsonl; a rerun skips finished shards. Examples: sslhub embed "
                                    "--model runs/simclr/export --data ../shared/data/cifar10 --out runs/emb; "
                                    "torchrun --nproc_per_node 2 -m sslhub embed --model M --data D --out EMB")
    em.add_argument("--model", required=True, help=model_help)
    em.add_argument("--data", required=True, help="shards folder, shard pattern, ImageFolder, image folder or CSV")
    em.add_argument("--split", default="train")
    em.add_argument("--out", required=True, help="embeddings folder (resumed when it holds this job's shards)")
    em.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    em.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                    help="L2-normalise the embeddings (default; --no-normalize keeps the raw features)")
    em.add_argument("--batch-size", type=int, default=256)
    em.add_argument("--workers", type=int, default=2, help="decoding processes per process")
    em.add_argument("--device", default="cpu", help="cpu, cuda (cuda:LOCAL_RANK under torchrun), cuda:1, mps")
    em.add_argument("--chunk", type=int, default=10_000,
                    help="samples per embedding shard for data that is not shards (folders, CSV)")
    em.add_argument("--overwrite", action="store_true", help="clear --out first (another model or data)")
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.set_defaults(func=_command("embed"))

    ph = sub.add_parser("push", help="publish a model folder on the Hugging Face Hub (safetensors + card)",
                        description="Example: sslhub push runs/simclr/export my-org/simclr-r18 --private. The endpoint "
                                    "and token are huggingface_hub's: HF_ENDPOINT, HF_TOKEN or `hf auth login`.")
    ph.add_argument("folder", help="an sslhub export, or a timm / open_clip / transformers model folder")
    ph.add_argument("repo", metavar="ORG/NAME", help="the Hub repo (created if needed)")
    ph.add_argument("--private", action="store_true",
                    help="create the repo private (an existing one keeps its visibility)")
    ph.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if new)")
    ph.add_argument("--message", metavar="MSG", help="commit message")
    ph.set_defaults(func=_command("push"))

    c = sub.add_parser("cards", help="write MODEL_CARDS.md: the card template and an index of exports",
                       description="Example: sslhub cards --out MODEL_CARDS.md runs/*/export")
    c.add_argument("exports", nargs="*", help="export folders to index")
    c.add_argument("--out", default="MODEL_CARDS.md")
    c.set_defaults(func=_command("cards"))

    d = sub.add_parser("demo", help="serve the Gradio demo: zero-shot, retrieval, neighbours, attention maps",
                       description="Example: sslhub demo open_clip:ViT-B-32/laion2b_s34b_b79k --data "
                                   "data/flickr8k-sample. Serves until Ctrl-C; see demos/README.md.")
    d.add_argument("model", help=model_help)
    dq = d.add_mutually_exclusive_group()
    dq.add_argument("--index", help="a saved index folder (sslhub index build)")
    dq.add_argument("--data", help="images to embed at start: a folder, ImageFolder or shards")
    d.add_argument("--split", default="train", help="split of --data shards")
    d.add_argument("--port", type=int, help="default: the first free port from 7860")
    d.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    d.add_argument("--share", action="store_true", help="also ask Gradio for a public share link")
    d.set_defaults(func=_command("demo"))

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(func=_command("methods"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # sslhub's own messages at INFO; libraries (open_clip logs to the root logger) at WARNING unless -v
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("sslhub").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = args.func(args)
    except (SslhubError, OSError) as e:  # bad input, explained; anything else is a bug: its traceback shows
        if args.verbose:  # -v: the full traceback
            raise
        print(f"sslhub: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop (that one stops between steps and saves): nothing to keep
        if args.verbose:
            raise
        print(f"sslhub: interrupted (Ctrl-C) during `sslhub {args.command}`", file=sys.stderr)
        return 130
    if result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
