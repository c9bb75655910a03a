"""Zero-shot classification from class names and prompt templates, and its few-shot twin.

The class matrix follows the open_clip / CLIP_benchmark protocol (Radford et al. 2021,
https://arxiv.org/abs/2103.00020, §3.1.4): embed every ``template.format(classname)``, L2-normalise
each, average per class, renormalise.  ``predict_proba`` is ``softmax(scale · img @ W.T)`` with the
model's own logit scale (100 for released CLIP weights).

The class matrix is cached in memory and on disk (``$SSLHUB_CACHE`` or ``~/.cache/sslhub``), keyed by
the model's fingerprint, the class names and the templates.

For encoders without a text tower, :class:`PrototypeClassifier` builds the class matrix from a few
labelled images per class (mean normalised embedding) and offers the same interface.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sslhub.atomic import atomic_write
from sslhub.errors import InputError, UnsupportedError
from sslhub.inference.templates import resolve_templates

log = logging.getLogger("sslhub.inference.zeroshot")
_MEMORY_CACHE: dict[str, torch.Tensor] = {}
DEFAULT_SCALE = 100.0


def cache_dir() -> Path:
    return Path(os.environ.get("SSLHUB_CACHE", Path.home() / ".cache" / "sslhub")) / "zeroshot"


def check_classnames(classnames: Sequence[str]) -> list[str]:
    names = [str(c).strip() for c in classnames]
    if not names:
        raise InputError("classnames: the label list is empty — give at least two labels")
    if any(not c for c in names):
        raise InputError(f"classnames: label #{[i for i, c in enumerate(names) if not c][0]} is empty")
    seen: dict[str, int] = {}
    for i, c in enumerate(names):
        if c.lower() in seen:
            first = seen[c.lower()]
            raise InputError(f"classnames: {c!r} (#{i}) repeats {names[first]!r} (#{first}); labels must be unique")
        seen[c.lower()] = i
    return names


def _scores_to_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall (%) of class scores ``(N, C)`` against ``labels (N,)``."""
    c = scores.shape[1]
    top = scores.topk(min(5, c), dim=1).indices
    top1 = top[:, 0] == labels
    recalls = [top1[labels == k].float().mean().item() for k in labels.unique().tolist()]
    return {"top1": round(100 * top1.float().mean().item(), 2),
            "top5": round(100 * (top == labels[:, None]).any(1).float().mean().item(), 2),
            "mean_per_class_recall": round(100 * sum(recalls) / len(recalls), 2)}


class _ClassMatrixClassifier:
    """Shared by zero-shot and prototype classifiers: ``weights (C, D)`` normalised rows."""

    classnames: list[str]
    weights: torch.Tensor
    scale: float

    def __init__(self, encoder):
        self.encoder = encoder

    def logits(self, images, batch_size: int = 64, progress: bool | None = None) -> torch.Tensor:
        feats = self.encoder.embed_images(images, batch_size=batch_size, normalize=True, progress=progress)  # (N, D)
        return self.scale * feats @ self.weights.T  # (N, C)

    def predict_proba(self, images, batch_size: int = 64) -> torch.Tensor:
        """``(N, C)`` class probabilities."""
        return self.logits(images, batch_size).softmax(dim=-1)

    def predict(self, images, k: int = 1, batch_size: int = 64) -> tuple[torch.Tensor, list[list[str]]]:
        """Top-k class indices ``(N, k)`` and their names."""
        idx = self.logits(images, batch_size).topk(min(k, len(self.classnames)), dim=-1).indices
        return idx, [[self.classnames[j] for j in row] for row in idx.tolist()]

    def evaluate(self, images, labels: torch.Tensor, batch_size: int = 64,
                 progress: bool | None = None) -> dict[str, float]:
        """Top-1, top-5 and mean per-class recall (%) on labelled images."""
        return _scores_to_metrics(self.logits(images, batch_size, progress), torch.as_tensor(labels))


class ZeroShotClassifier(_ClassMatrixClassifier):
    """``ZeroShotClassifier(encoder, ["cat", "dog"], templates="imagenet")``."""

    def __init__(self, encoder, classnames: Sequence[str], templates: Union[str, Sequence[str], None] = "default",
                 scale: float | None = None, cache: bool = True, batch_size: int = 256, progress: bool | None = None):
        super().__init__(encoder)
        if not getattr(encoder, "has_text", False):
            raise UnsupportedError(f"{getattr(encoder, 'name', 'this encoder')} has no text tower: zero-shot needs an "
                            "image–text model; use PrototypeClassifier with a few labelled images instead")
        self.classnames = check_classnames(classnames)
        self.templates = resolve_templates(templates)
        model_scale = getattr(encoder, "logit_scale", None)
        self.scale = float(scale if scale is not None else (model_scale or DEFAULT_SCALE))
        self.weights = self._class_matrix(cache, batch_size, progress)  # (C, D)

    def _key(self) -> str | None:
        fp = getattr(self.encoder, "fingerprint", None)
        if not fp:
            return None
        blob = json.dumps({"model": fp, "classes": self.classnames, "templates": self.templates})
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _class_matrix(self, cache: bool, batch_size: int, progress: bool | None) -> torch.Tensor:
        key = self._key() if cache else None
        if key and key in _MEMORY_CACHE:
            return _MEMORY_CACHE[key]
        path = cache_dir() / f"{key}.safetensors" if key else None
        if path is not None and path.is_file():
            try:
                w = load_file(str(path))["weights"]
                _MEMORY_CACHE[key] = w
                return w
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                log.warning("zero-shot cache %s unreadable; rebuilding it", path)
        w = build_class_matrix(self.encoder, self.classnames, self.templates, batch_size, progress)
        if key:
            _MEMORY_CACHE[key] = w
            atomic_write(path, lambda tmp: save_file({"weights": w.contiguous()}, tmp))
        return w


def build_class_matrix(encoder, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256,
                       progress: bool | None = None) -> torch.Tensor:
    """``(C, D)``: per class, the renormalised mean of the normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]  # class-major
    emb = encoder.embed_text(texts, batch_size=batch_size, normalize=True, progress=progress)  # (C*T, D)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def check_labels(encoder, classnames: Sequence[str], templates: Union[str, Sequence[str], None] = "default",
                 threshold: float = 0.9, weights: torch.Tensor | None = None) -> list[dict]:
    """Pairs of labels the text tower can hardly tell apart, most similar first, with a suggestion.

    Two class embeddings with cosine similarity ≥ ``threshold`` are likely to be confused: the
    image has to be much closer to one than the other for zero-shot to pick right. ``weights``: the
    class matrix ``(C, D)`` when already built (e.g. ``ZeroShotClassifier.weights``).
    """
    names = check_classnames(classnames)
    w = weights if weights is not None else build_class_matrix(encoder, names, resolve_templates(templates))
    sim = w @ w.T
    warnings = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            s = float(sim[i, j])
            if s >= threshold:
                warnings.append({
                    "labels": (names[i], names[j]), "similarity": round(s, 4),
                    "suggestion": f"'{names[i]}' and '{names[j]}' embed almost alike (cosine {s:.2f}): make them "
                                  f"more distinct, e.g. add what sets them apart ('{names[i]} (…)'), or merge them"})
    return sorted(warnings, key=lambda w_: -w_["similarity"])


class PrototypeClassifier(_ClassMatrixClassifier):
    """Few-shot classes for any encoder: ``PrototypeClassifier(encoder, {"cat": [img, ...], ...})``.

    Each class is the renormalised mean of its images' normalised embeddings (a nearest-class-mean
    classifier); the interface is :class:`ZeroShotClassifier`'s.
    """

    def __init__(self, encoder, examples: Mapping[str, Sequence], scale: float = DEFAULT_SCALE, batch_size: int = 64):
        super().__init__(encoder)
        self.classnames = check_classnames(list(examples))
        rows = []
        for name in self.classnames:
            imgs = examples[name]
            if len(imgs) == 0:
                raise InputError(f"class {name!r} has no example images")
            feats = encoder.embed_images(imgs, batch_size=batch_size, normalize=True)
            rows.append(F.normalize(feats.mean(0), dim=-1))
        self.weights = torch.stack(rows)  # (C, D)
        self.scale = float(scale)
