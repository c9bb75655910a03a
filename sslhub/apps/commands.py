"""What the ``sslhub`` sub-commands do; ``sslhub/apps/cli.py`` only parses arguments (and imports this
module when a command runs, so that ``sslhub --help`` does not wait for torch).

Each function takes the parsed arguments and returns the JSON-able result the CLI prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from pathlib import Path

from sslhub import distributed
from sslhub.data.sources import open_source
from sslhub.errors import InputError
from sslhub.eval import protocols
from sslhub.eval.finetune import finetune
from sslhub.eval.labels import match_labels
from sslhub.eval.linear import check_low_shot, linear_probe, low_shot
from sslhub.inference.embed import embed as embed_data
from sslhub.inference.load import load_encoder
from sslhub.inference.ondisk import build_from_embeddings
from sslhub.inference.retrieval import build_index, load_index
from sslhub.methods.registry import list_methods
from sslhub.publish.card import card_index
from sslhub.publish.push import push_command
from sslhub.train.recipe import Recipe, load_recipe
from sslhub.train.trainer import train as train_recipe


def train(args: argparse.Namespace, recipe: Recipe | None = None) -> dict:
    """``sslhub train``; ``recipe`` when the caller has already read ``args.recipe`` with ``args.set``."""
    recipe = recipe if recipe is not None else load_recipe(args.recipe, args.set)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    return train_recipe(recipe, out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)


def push(args: argparse.Namespace) -> dict:
    return push_command(args)


def demo(args: argparse.Namespace) -> None:
    # the demo needs the `demo` extra (gradio, imported at the top of sslhub.apps.demo): imported when it runs
    launch = importlib.import_module("sslhub.apps.demo").launch
    launch(args.model, index=args.index, data=args.data, split=args.split, host=args.host, port=args.port,
           share=args.share)


def methods(args: argparse.Namespace) -> dict:
    names = {name: cls.paper for name, cls in list_methods().items()}
    for name, paper in names.items():
        print(f"{name:12s} {paper}", file=sys.stderr)
    return {"methods": names}


def eval_knn(args: argparse.Namespace) -> dict:
    enc = load_encoder(args.model)
    res = protocols.knn(enc, args.train, args.train_split, args.test, args.test_split, ks=args.k,
                        temperature=args.temperature, workers=args.workers)
    return {"model": args.model, "bank": args.train, "test": args.test,
            "knn": {k: v for k, v in res.items() if k not in ("bank", "test")}}


def eval_linear(args: argparse.Namespace) -> dict:
    enc = load_encoder(args.model)
    train = protocols.decode(enc, args.train, args.train_split, args.workers, "train")
    test = protocols.decode(enc, args.test, args.test_split, args.workers, "test")
    labels, keep, info = match_labels(train.classes, test.classes, test.labels, f"test data {args.test}")
    check_low_shot(train.labels.numpy(), args.low_shot, "--low-shot", train.classes)  # before the features
    ftr, fte = protocols.features(enc, train), protocols.features(enc, test)[keep]
    out = {"model": args.model, "train": args.train, "test": args.test, **info,
           "linear": linear_probe(ftr, train.labels, fte, labels)}
    if args.low_shot:
        out["low_shot"] = low_shot(ftr, train.labels, fte, labels, fractions=tuple(args.low_shot))
    if args.finetune_epochs:
        if enc.kind != "sslhub":
            raise InputError("--finetune-epochs needs an sslhub export (its backbone is trained in place)")
        matched = dataclasses.replace(test, images=test.images[keep], labels=labels)  # classes matched by name
        out["finetune"] = finetune(enc.model, train, matched, epochs=args.finetune_epochs, lr=args.finetune_lr,
                                   layer_decay=args.layer_decay)
    return out


def eval_zeroshot(args: argparse.Namespace) -> dict:
    enc = load_encoder(args.model)
    names = None
    if args.classes:
        path = Path(args.classes)
        names = path.read_text().splitlines() if path.is_file() else args.classes.split(",")
        names = [n.strip() for n in names if n.strip()]
    res = protocols.zeroshot(enc, args.test, args.test_split, args.templates, names, args.workers)
    check = res.pop("prompt_check")
    return {"model": args.model, "test": args.test, "classes": res.pop("classes"), "templates": res.pop("templates"),
            "zeroshot": {k: v for k, v in res.items() if k not in ("data", "split", "template_set")},
            "prompt_check": check}


def eval_retrieval(args: argparse.Namespace) -> dict:
    enc = load_encoder(args.model)
    res = protocols.retrieval(enc, args.data, args.split, ks=args.k, workers=args.workers)
    return {"model": args.model, "data": args.data, "split": args.split, "images": res["images"],
            "captions": res["captions"], "retrieval": {k: res[k] for k in ("image_to_text", "text_to_image")}}


def index_build(args: argparse.Namespace) -> dict:
    if args.embeddings and (args.model or args.data):
        raise InputError("give either --embeddings (a folder from `sslhub embed`) or --model with --data "
                         "(embedded now), not both")
    if args.embeddings:
        index = build_from_embeddings(args.embeddings, args.out, memory_budget_mb=args.memory_budget_mb,
                                      kind=args.kind, refine=args.refine)
        return {"index": str(args.out), "vectors": len(index), "kind": index.kind, "dim": index.dim,
                "layout": index.info.get("layout", "ram"), "reason": index.info.get("reason")}
    if not (args.model and args.data):
        raise InputError("sslhub index build needs --embeddings EMB, or --model and --data to embed images now")
    if args.kind == "ondisk":
        raise InputError("--kind ondisk indexes saved embeddings: write them with `sslhub embed`, then pass "
                         "--embeddings")
    enc = load_encoder(args.model)
    data = protocols.decode(enc, args.data, args.split, args.workers, "images")
    classes = data.classes or open_source(args.data, args.split).classes
    meta = [{"key": k, **({"label": int(l), "class": classes[l] if classes and 0 <= l < len(classes) else None}
                          if l >= 0 else {})} for k, l in zip(data.keys, data.labels.tolist())]
    index = build_index(protocols.features(enc, data).numpy(), ids=data.keys, metadata=meta, kind=args.kind)
    index.info.update({"model": args.model, "data": args.data, "split": args.split})
    path = index.save(args.out)
    return {"index": str(path), "vectors": len(index), "kind": index.kind, "dim": index.dim}


def index_search(args: argparse.Namespace) -> dict:
    index = load_index(args.index)
    model = args.model or index.info.get("model")
    if not model:
        raise InputError(f"{args.index}: the index does not record its model; pass --model")
    enc = load_encoder(model)
    if args.text:
        q = enc.embed_text(args.text, normalize=True)
        queries = args.text
    else:
        q = enc.embed_images(args.image, normalize=True)
        queries = args.image
    hits = index.search_meta(q.numpy(), k=args.k)
    return {"index": args.index, "model": model, "results": [{"query": qq, "hits": h} for qq, h in zip(queries, hits)]}


def cards(args: argparse.Namespace) -> dict:
    text = card_index(args.exports, " ".join(["--out", args.out, *args.exports]))
    Path(args.out).write_text(text)
    return {"written": args.out, "checkpoints": len(args.exports)}


def embed(args: argparse.Namespace) -> dict | None:
    """``sslhub embed`` in one process or each process of a torchrun job; rank 0 returns the summary."""
    distributed.init_from_env()  # gloo: the job only waits on, and sums over, the processes
    device = args.device
    if device == "cuda" and distributed.world_size() > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    enc = load_encoder(args.model, device=device)
    summary = embed_data(enc, args.data, args.out, size=protocols.decode_size(enc), split=args.split, model=args.model,
                         normalize=args.normalize, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                         chunk=args.chunk, overwrite=args.overwrite, progress=not args.no_progress)
    return summary if distributed.is_main() else None
