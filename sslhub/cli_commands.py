"""What the ``sslhub`` sub-commands do; ``sslhub/cli.py`` only parses arguments.

Each function takes the parsed arguments and returns the JSON-able result the CLI prints.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def decode_size(enc) -> int:
    """The size to decode images at: the one the encoder centre-crops from (its preprocessing does the rest)."""
    return int(enc.image_size / getattr(enc, "crop_pct", 1.0))


def labelled(enc, spec: str, split: str, workers: int, what: str):
    from .data.images import decode_all
    from .data.sources import open_source

    return decode_all(open_source(spec, split), decode_size(enc), workers, desc=f"decoding {what}")


def _features(enc, data) -> torch.Tensor:
    return enc.embed_images(data.images, batch_size=256, normalize=True, progress=True)


def eval_knn(args: argparse.Namespace) -> dict:
    from .eval.knn import knn_eval
    from .loading import load_encoder

    enc = load_encoder(args.model)
    bank = labelled(enc, args.train, args.train_split, args.workers, "bank")
    test = labelled(enc, args.test, args.test_split, args.workers, "test")
    res = knn_eval(_features(enc, bank), bank.labels, _features(enc, test), test.labels, ks=tuple(args.k),
                   temperature=args.temperature)
    return {"model": args.model, "bank": args.train, "test": args.test, "knn": res}


def eval_linear(args: argparse.Namespace) -> dict:
    from .eval.linear import linear_probe, low_shot
    from .loading import load_encoder

    enc = load_encoder(args.model)
    train = labelled(enc, args.train, args.train_split, args.workers, "train")
    test = labelled(enc, args.test, args.test_split, args.workers, "test")
    ftr, fte = _features(enc, train), _features(enc, test)
    out = {"model": args.model, "train": args.train, "test": args.test,
           "linear": linear_probe(ftr, train.labels, fte, test.labels)}
    if args.low_shot:
        out["low_shot"] = low_shot(ftr, train.labels, fte, test.labels, fractions=tuple(args.low_shot))
    if args.finetune_epochs:
        from .eval.finetune import finetune

        if enc.kind != "sslhub":
            raise ValueError("--finetune-epochs needs an sslhub export (its backbone is trained in place)")
        out["finetune"] = finetune(enc.model, train, test, epochs=args.finetune_epochs, lr=args.finetune_lr,
                                   layer_decay=args.layer_decay)
    return out


def _classnames(args, source_classes) -> list[str]:
    if args.classes:
        path = Path(args.classes)
        names = path.read_text().splitlines() if path.is_file() else args.classes.split(",")
        return [n.strip() for n in names if n.strip()]
    if not source_classes:
        raise ValueError(f"{args.test}: no class names found (no dataset.json 'classes', not an ImageFolder): "
                         "give --classes 'cat,dog,...' or a file with one name per line")
    return list(source_classes)


def eval_zeroshot(args: argparse.Namespace) -> dict:
    from .loading import load_encoder
    from .zeroshot import ZeroShotClassifier, check_labels

    enc = load_encoder(args.model)
    test = labelled(enc, args.test, args.test_split, args.workers, "test")
    names = _classnames(args, test.classes)
    templates = Path(args.templates).read_text().splitlines() if Path(args.templates).is_file() else args.templates
    clf = ZeroShotClassifier(enc, names, templates=templates)
    metrics = clf.evaluate(test.images, test.labels, batch_size=256)
    return {"model": args.model, "test": args.test, "classes": len(names), "templates": len(clf.templates),
            "zeroshot": metrics, "prompt_check": check_labels(enc, names, clf.templates)}


def _image_text(enc, spec: str, split: str, workers: int):
    """Images and all their captions from shards with ``json`` (``captions``) or ``txt`` per image."""
    from .data.images import decode_all
    from .data.sources import open_source

    src = open_source(spec, split)
    data = decode_all(src, decode_size(enc), workers, desc="decoding images")
    by_key = {s.key: s for s in src.samples}
    captions, owner = [], []
    for i, key in enumerate(data.keys):
        s = by_key[key]
        caps = (s.meta or {}).get("captions") or ([s.text] if s.text else [])
        if not caps:
            raise ValueError(f"{key}: no caption (.txt or .json 'captions'): retrieval needs image–text pairs")
        captions += caps
        owner += [i] * len(caps)
    return data, captions, torch.tensor(owner)


def eval_retrieval(args: argparse.Namespace) -> dict:
    from .loading import load_encoder
    from .retrieval import image_text_retrieval

    enc = load_encoder(args.model)
    data, captions, owner = _image_text(enc, args.data, args.split, args.workers)
    img = _features(enc, data)
    txt = enc.embed_text(captions, normalize=True, progress=True)
    res = image_text_retrieval(img, txt, owner, ks=tuple(args.k))
    return {"model": args.model, "data": args.data, "split": args.split, "images": len(data),
            "captions": len(captions), "retrieval": res}


def index_build(args: argparse.Namespace) -> dict:
    from .data.sources import open_source
    from .loading import load_encoder
    from .retrieval import build_index

    enc = load_encoder(args.model)
    data = labelled(enc, args.data, args.split, args.workers, "images")
    classes = data.classes or open_source(args.data, args.split).classes
    meta = [{"key": k, **({"label": int(l), "class": classes[l] if classes and 0 <= l < len(classes) else None}
                          if l >= 0 else {})} for k, l in zip(data.keys, data.labels.tolist())]
    index = build_index(_features(enc, data).numpy(), ids=data.keys, metadata=meta, kind=args.kind)
    index.info.update({"model": args.model, "data": args.data, "split": args.split})
    path = index.save(args.out)
    return {"index": str(path), "vectors": len(index), "kind": index.kind, "dim": index.dim}


def index_search(args: argparse.Namespace) -> dict:
    from .loading import load_encoder
    from .retrieval import load_index

    index = load_index(args.index)
    model = args.model or index.info.get("model")
    if not model:
        raise ValueError(f"{args.index}: the index does not record its model; pass --model")
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
    from .card import card_index

    text = card_index(args.exports, " ".join(["--out", args.out, *args.exports]))
    Path(args.out).write_text(text)
    return {"written": args.out, "checkpoints": len(args.exports)}
