"""Evaluations on a loaded :class:`~sslhub.inference.loaders.base.Encoder`, shared by the CLI and the trainer.

Each takes an encoder and a data spec (anything ``open_source`` reads) and returns a JSON-able dict:
k-NN on frozen features, zero-shot classification with prompt templates, image↔text retrieval.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from sslhub.data.images import DecodedImages, decode_all
from sslhub.data.sources import DataError, open_source
from sslhub.errors import InputError
from sslhub.eval.knn import knn_eval
from sslhub.eval.labels import match_labels
from sslhub.eval.metrics import image_text_retrieval
from sslhub.inference.embed import embed_in_memory
from sslhub.inference.zeroshot import ZeroShotClassifier, check_labels


def decode_size(enc) -> int:
    """The size to decode images at: the one the encoder centre-crops from (its preprocessing does the rest)."""
    return int(enc.image_size / getattr(enc, "crop_pct", 1.0))


def decode(enc, spec: str, split: str, workers: int = 2, what: str = "images", progress: bool = True):
    return decode_all(open_source(spec, split), decode_size(enc), workers, progress=progress, desc=f"decoding {what}")


def features(enc, data, progress: bool = True) -> torch.Tensor:
    """L2-normalised image embeddings ``(N, D)`` of decoded uint8 images."""
    return enc.embed_images(data.images, batch_size=256, normalize=True, progress=progress)


def knn(enc, bank: str, bank_split: str, test: str, test_split: str, ks: Sequence[int] = (20, 200),
        temperature: float = 0.07, workers: int = 2, progress: bool = True, *,
        bank_data: DecodedImages | None = None, test_data: DecodedImages | None = None,
        stream_bank: bool = False) -> dict:
    """Weighted k-NN top-1/top-5 (%) of ``test`` against the labelled ``bank`` (see ``eval.knn``).

    ``bank_data`` / ``test_data``: the same data already decoded at ``decode_size(enc)`` (the trainer passes
    its training images), so it is not decoded again.  ``stream_bank``: the bank's images stream through the
    encoder (``embed_in_memory``) and only their embeddings are held — a bank larger than memory (the trainer
    asks for it when its training data streams).
    """
    if bank_data is None and stream_bank:
        bank_feats, bank_labels, bank_classes, _ = embed_in_memory(enc, bank, size=decode_size(enc), split=bank_split,
                                                                   workers=workers, progress=progress)
    else:
        b = bank_data if bank_data is not None else decode(enc, bank, bank_split, workers, "bank", progress)
        bank_feats, bank_labels, bank_classes = features(enc, b, progress), b.labels, b.classes
    t = test_data if test_data is not None else decode(enc, test, test_split, workers, "test", progress)
    labels, keep, info = match_labels(bank_classes, t.classes, t.labels, f"k-NN queries {test}")
    res = knn_eval(bank_feats, bank_labels, features(enc, t, progress)[keep], labels, ks=tuple(ks),
                   temperature=temperature)
    return {**res, **info, "bank": bank, "test": test}


def read_templates(templates: str | Sequence[str]) -> str | list[str]:
    """A template-set name, a file with one template per line, or a list of templates."""
    if isinstance(templates, str) and Path(templates).is_file():
        return [t for t in Path(templates).read_text().splitlines() if t.strip()]
    return templates


def zeroshot(enc, data: str, split: str = "test", templates: str | Sequence[str] = "default",
             classes: Sequence[str] | None = None, workers: int = 2, progress: bool = True) -> dict:
    """Zero-shot top-1/top-5/mean per-class recall on labelled ``data``, plus the prompt check.

    ``classes`` default to the data's own class names (``dataset.json`` or ImageFolder folders).
    """
    test = decode(enc, data, split, workers, "test", progress)
    names = list(classes or test.classes or [])
    if not names:
        raise InputError(f"{data}: no class names found (no dataset.json 'classes', not an ImageFolder): "
                         "give the class names explicitly")
    labels, keep, info = match_labels(names, test.classes, test.labels, f"zero-shot data {data}")
    clf = ZeroShotClassifier(enc, names, templates=read_templates(templates), progress=progress)
    metrics = clf.evaluate(test.images[keep], labels, batch_size=256, progress=progress)
    return {"data": data, "split": split, "classes": len(names), "templates": len(clf.templates),
            "template_set": templates if isinstance(templates, str) else "custom", **metrics, **info,
            "prompt_check": check_labels(enc, names, clf.templates, weights=clf.weights)}


def image_text_pairs(enc, data: str, split: str, workers: int = 2, progress: bool = True):
    """Decoded images, all their captions ``(M,)`` and the image each caption belongs to ``(M,)``."""
    decoded = decode(enc, data, split, workers, "images", progress)
    if decoded.texts is None or not all(decoded.texts):
        missing = next((k for k, t in zip(decoded.keys, decoded.texts or [[]] * len(decoded)) if not t), "?")
        raise DataError(f"{missing}: no caption (.txt or .json 'captions'): retrieval needs image–text pairs")
    captions = [c for caps in decoded.texts for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(decoded.texts) for _ in caps])
    return decoded, captions, owner


def retrieval(enc, data: str, split: str = "test", ks: Sequence[int] = (1, 5, 10), workers: int = 2,
              progress: bool = True) -> dict:
    """Image→text and text→image recall@k (%) over every image and caption of ``data`` (Flickr/COCO protocol)."""
    decoded, captions, owner = image_text_pairs(enc, data, split, workers, progress)
    img = features(enc, decoded, progress)
    txt = enc.embed_text(captions, normalize=True, progress=progress)
    return {"data": data, "split": split, "images": len(decoded), "captions": len(captions),
            **image_text_retrieval(img, txt, owner, ks=tuple(ks))}
