"""The demo's computations, without the page: uploads and labels checked, the index embedded or loaded,
zero-shot (with its prompt progress), retrieval, nearest neighbours and attention (``Backend``).

Bad input raises ``gr.Error`` with what to do: a message in the page, one line in the server's log
(``user_errors``). The page itself is ``sslhub.apps.demo``.
"""
from __future__ import annotations

import os

from sslhub.errors import InputError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no calls to outside hosts

import functools  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

from sslhub.data.images import BadImage, decode_all, open_image, to_rgb  # noqa: E402
from sslhub.data.sources import Sample, open_source  # noqa: E402
from sslhub.inference.attention import (  # noqa: E402
    AttentionUnsupported,
    attention_map,
    input_region,
    num_heads,
    overlay,
)
from sslhub.inference.loaders.base import Encoder  # noqa: E402
from sslhub.inference.retrieval import Index, build_index, load_index  # noqa: E402
from sslhub.inference.templates import TEMPLATE_SETS  # noqa: E402
from sslhub.inference.zeroshot import (  # noqa: E402
    PrototypeClassifier,
    ZeroShotClassifier,
    check_labels,
)


log = logging.getLogger("sslhub.apps.demo")  # the demo's log, whichever of its modules writes

MAX_PIXELS = 50_000_000  # refused above this: decoding alone would take ≥ 150 MB per request
WORK_SIDE = 1024  # uploads are downscaled to this longest side (every encoder's input is far smaller)
MAX_LABELS = 100  # zero-shot embeds labels × templates prompts (imagenet: 80 templates)
PROMPT_BATCH = 256  # prompts per text-tower batch (embed_text's default): one progress step each
CLASSIFIERS = 64  # zero-shot classifiers (label sets × template sets) kept in memory
SHOTS = 16  # few-shot prototype classifier: images per class taken from the index
KNN_TEMPERATURE = 0.07  # k-NN vote weights exp(similarity / T), the DINO / InstDisc k-NN protocol
THUMB_SIDE = 256  # gallery thumbnails
NO_INDEX = ("No index loaded: start the demo with `--data DATA` (a folder of images or shards, embedded at "
            "start) or `--index FOLDER` (saved by `sslhub index build`).")


# ------------------------------------------------------------------------------------------- input
def read_upload(payload: dict | None) -> tuple[Image.Image, str]:
    """An uploaded file (Gradio's file payload) → RGB image of at most WORK_SIDE px, and a note if downscaled.

    Raises ``gr.Error`` with what to do for no file, a file that is not an image, an image over
    MAX_PIXELS, or one that cannot be decoded (truncated, damaged).
    """
    if not payload or not payload.get("path"):
        raise gr.Error("Upload an image first (or click one of the examples).")
    name = payload.get("orig_name") or Path(payload["path"]).name
    try:
        img = Image.open(payload["path"])  # reads the header only
    except UnidentifiedImageError:
        raise gr.Error(f"{name} is not an image: upload a JPEG, PNG, WebP, BMP or GIF file.") from None
    except (Image.DecompressionBombError, OSError) as e:
        raise gr.Error(f"{name}: cannot open it ({e}).") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise gr.Error(f"{name} is {w}×{h} ({w * h / 1e6:.0f} megapixels): the demo takes images up to "
                       f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it first.")
    img.draft(None, (WORK_SIDE, WORK_SIDE))  # JPEG: decode directly at 1/2, 1/4 or 1/8 scale when large
    try:
        img.load()
        img = to_rgb(ImageOps.exif_transpose(img))  # phone photos: apply the EXIF rotation
    except (OSError, SyntaxError, ValueError) as e:
        img.close()
        raise gr.Error(f"{name}: cannot decode it ({e}); the file may be truncated or damaged.") from None
    if max(w, h) <= WORK_SIDE:
        return img, ""
    img.thumbnail((WORK_SIDE, WORK_SIDE), Image.BICUBIC, reducing_gap=2.0)
    return img, f"{name} ({w}×{h}, {w * h / 1e6:.1f} MP) was downscaled to {img.width}×{img.height}."


def parse_labels(text: str | None) -> list[str]:
    """Labels separated by commas or new lines; blanks dropped. ``gr.Error`` for fewer than 2 or too many."""
    labels = [s.strip() for s in re.split(r"[,\n]", text or "") if s.strip()]
    if len(labels) < 2:
        raise gr.Error("Type at least two labels, separated by commas or new lines (e.g. dog, cat, bird).")
    if len(labels) > MAX_LABELS:
        raise gr.Error(f"{len(labels)} labels: the demo takes up to {MAX_LABELS}.")
    return labels


def user_errors(endpoint: str) -> Callable[[Callable], Callable]:
    """Decorate an endpoint so bad input (a ``gr.Error``) is logged as one line, not a traceback.

    Gradio prints the whole traceback (~30 lines) of every exception a handler raises unless it is a
    ``gr.Error`` with ``print_exception=False``: each typo a visitor made buried the server console.
    The visitor still gets the message in the page. Any other exception is a bug: its traceback prints.
    """
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)  # keeps the signature: Gradio finds the gr.Progress parameter through it
        def endpoint_method(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except gr.Error as e:
                log.info("user error in %s: %s", endpoint, " ".join(str(e.message).split()))
                e.print_exception = False
                raise
        return endpoint_method
    return decorate


# ------------------------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    """``"under a second"``, ``"42 s"`` or ``"3 min 5 s"``."""
    if seconds < 1:
        return "under a second"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def prompt_progress(progress: Callable, labels: int, templates: int) -> Callable[[int, int], None]:
    """``report(done, total)``: prompts embedded so far → ``progress(fraction, desc=…)`` with the time left.

    The time left is extrapolated from the batches done so far (they are alike: PROMPT_BATCH prompts each).
    """
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        left = (time.monotonic() - start) * (total - done) / max(done, 1)
        progress(done / total, desc=f"embedding {labels} labels × {templates} templates: {done}/{total} prompts, "
                                    f"{_duration(left)} left")
    return report


class ReportingText:
    """An encoder whose ``embed_text`` embeds batch by batch and calls ``report(done, total)`` after each.

    ``ZeroShotClassifier`` embeds all labels × templates prompts in one ``embed_text`` call that reports
    to the terminal at most: 100 labels × 80 templates (8000 prompts) took a minute and more on a CPU
    with the page silent. The batches are those ``embed_text`` makes itself (prompts sorted by length,
    ``batch_size`` at a time), so the class matrix is the same. Everything else, the fingerprint that
    keys the zero-shot caches included, is the wrapped encoder's.
    """

    def __init__(self, encoder: Encoder, report: Callable[[int, int], None]):
        self.encoder, self.report = encoder, report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)

    def embed_text(self, texts: Sequence[str] | str, batch_size: int = PROMPT_BATCH, normalize: bool = False,
                   progress: bool | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.encoder.dim)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [texts[i] for i in rows]
            out[rows] = self.encoder.embed_text(batch, batch_size=batch_size, normalize=normalize, progress=False)
            self.report(start + len(rows), len(texts))
        return out


# ------------------------------------------------------------------------------------------- index
def decode_size(encoder: Encoder) -> int:
    """Decode data at the size the encoder centre-crops from (its own preprocessing does the rest)."""
    size = encoder.image_size if isinstance(encoder.image_size, int) else max(encoder.image_size)
    return round(size / encoder.crop_pct)


def index_data(encoder: Encoder, data: str | Path, split: str = "train", workers: int = 0) -> tuple[Index, list]:
    """Embed a data set (folder of images, ImageFolder, shards) into a FAISS index; progress on the terminal.

    Metadata rows are those of ``sslhub index build`` (key, label, class), so both kinds of index read alike.
    Returns the index and the source's samples (for the gallery images).
    """
    source = open_source(data, split)
    decoded = decode_all(source, decode_size(encoder), workers, progress=True, desc=f"decoding {data}")
    emb = encoder.embed_images(decoded.images, batch_size=128, normalize=True, progress=True)  # (N, D)
    classes = decoded.classes
    meta = [{"key": k, **({"label": lab, "class": classes[lab] if classes and lab < len(classes) else None}
                          if lab >= 0 else {})} for k, lab in zip(decoded.keys, decoded.labels.tolist())]
    index = build_index(emb.numpy(), ids=decoded.keys, metadata=meta)
    index.info.update({"model": encoder.name, "data": str(data), "split": split})
    return index, source.samples


def index_folder(encoder: Encoder, path: str | Path) -> tuple[Index, list]:
    """A saved index folder, and the samples of the data it records (empty when that data is not here)."""
    index = load_index(path)
    if index.dim != encoder.dim:
        raise InputError(f"{path} holds {index.dim}-d vectors but {encoder.name} embeds {encoder.dim}-d: "
                         f"use the model that built it ({index.info.get('model', 'not recorded')})")
    if index.info.get("model") not in (None, encoder.name):
        log.warning("%s was built with %s, not %s: results are only meaningful for the same weights",
                    path, index.info["model"], encoder.name)
    data = index.info.get("data")
    try:
        return index, open_source(data, index.info.get("split", "train")).samples if data else []
    except ValueError as e:  # DataError: the data moved or is on another machine
        log.warning("%s: its images are unavailable (%s); results are listed without pictures", path, e)
        return index, []


class Backend:
    """The demo's computations, one method per endpoint; bad input raises ``gr.Error`` with what to do."""

    def __init__(self, encoder: Encoder, index: Index | None = None, samples: Sequence[Sample] = (),
                 k: int = 8):
        self.encoder, self.index, self.k = encoder, index, k
        self.samples = {s.key: s for s in samples}
        self.name = encoder.name or encoder.kind
        try:
            self.heads, self.no_attention = num_heads(encoder), None
        except AttentionUnsupported as e:
            self.heads, self.no_attention = 0, str(e)
        self.prototypes = None if encoder.has_text else self._prototypes()
        self._classifiers: OrderedDict[tuple, tuple[ZeroShotClassifier, str]] = OrderedDict()  # LRU
        self._classifiers_lock = threading.Lock()  # requests run in threads (the queue's concurrency)
        self._thumbnail = functools.lru_cache(maxsize=1024)(self._load_thumbnail)

    # ---------------------------------------------------------------- what the page explains
    @property
    def no_text(self) -> str:
        return (f"{self.name} has no text tower, so text queries are off: they need an image–text model "
                "(CLIP, SigLIP). Image queries work.")

    @property
    def zero_shot_info(self) -> str:
        if self.encoder.has_text:
            return ""
        if self.prototypes is not None:
            names = ", ".join(self.prototypes.classnames)
            return (f"{self.name} has no text tower, so this tab is few-shot: each class is the mean "
                    f"embedding of up to {SHOTS} of its images in the index. Classes: {names}.")
        return (f"{self.name} has no text tower, so it cannot classify from typed labels. Start the demo "
                "with a labelled `--data` (an ImageFolder, or shards with classes) to get a few-shot "
                "classifier from its labels here.")

    def _prototypes(self) -> PrototypeClassifier | None:
        """Few-shot classes from the index's labelled rows (up to SHOTS images each), if it has any."""
        if self.index is None or not self.index.metadata or not self.samples:
            return None
        examples: dict[str, list[Image.Image]] = {}
        for key, row in zip(self.index.ids or [], self.index.metadata):
            name = row.get("class") or (str(row["label"]) if "label" in row else None)
            if name is not None and len(examples.setdefault(name, [])) < SHOTS and key in self.samples:
                examples[name].append(self._image(key))
        examples = {c: imgs for c, imgs in examples.items() if imgs}
        return PrototypeClassifier(self.encoder, examples) if len(examples) >= 2 else None

    def _classifier(self, labels: tuple[str, ...], templates: str,
                    progress: Callable) -> tuple[ZeroShotClassifier, str]:
        """The zero-shot classifier and its warnings, from the last CLASSIFIERS label sets or made now.

        Not ``functools.lru_cache``: ``progress`` belongs to the request, not to the cache key.
        """
        key = (labels, templates)
        with self._classifiers_lock:
            if key in self._classifiers:
                self._classifiers.move_to_end(key)
                return self._classifiers[key]
        made = self._make_classifier(labels, templates, progress)
        with self._classifiers_lock:
            self._classifiers[key] = made
            while len(self._classifiers) > CLASSIFIERS:
                self._classifiers.popitem(last=False)
        return made

    def _make_classifier(self, labels: tuple[str, ...], templates: str,
                         progress: Callable) -> tuple[ZeroShotClassifier, str]:
        """Embed labels × templates (reported to ``progress``), then flag labels that embed almost alike."""
        report = prompt_progress(progress, len(labels), len(TEMPLATE_SETS[templates]))
        try:
            clf = ZeroShotClassifier(ReportingText(self.encoder, report), labels, templates=templates)
        except ValueError as e:  # repeated labels
            raise gr.Error(str(e)) from None
        clf.encoder = self.encoder  # the cached classifier keeps no request's progress
        warnings = [w["suggestion"] for w in check_labels(self.encoder, labels, templates, weights=clf.weights)]
        return clf, "\n".join(f"- ⚠️ {w}" for w in warnings)

    # ---------------------------------------------------------------- images of the index
    def _image(self, key: Any) -> Image.Image:
        s = self.samples[key]
        return open_image(s.data if s.data is not None else s.path, str(key))

    def _load_thumbnail(self, key: Any) -> Image.Image | None:
        if key not in self.samples:
            return None
        try:
            img = self._image(key)
        except BadImage as e:
            log.warning("gallery: %s", e)
            return None
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        return img

    def _caption(self, key: Any) -> str:
        s = self.samples.get(key)
        caps = ((s.meta or {}).get("captions") or ([s.text] if s.text else [])) if s else []
        return caps[0] if caps else ""

    def _results(self, query: np.ndarray, k: int, label_first: bool = False) -> tuple[list, list, list[dict]]:
        """Search the index; → gallery items ``(image, caption)``, table rows, and the hits."""
        hits = self.index.search_meta(query, k=max(1, int(k)))[0]
        gallery, table = [], []
        for rank, hit in enumerate(hits, 1):
            label, caption = hit.get("class") or hit.get("label", ""), self._caption(hit["id"])
            table.append([rank, round(hit["score"], 4), label, caption, str(hit["id"])])
            thumb = self._thumbnail(hit["id"])
            if thumb is not None:
                words = [str(label)] if label_first and label != "" else []
                words += [f"{hit['score']:.3f}"] + ([caption[:60]] if caption and not label_first else [])
                gallery.append((thumb, " · ".join(words)))
        return gallery, table, hits

    # ---------------------------------------------------------------- endpoints
    @user_errors("zero-shot")
    def zero_shot(self, image: dict | None, labels: str | None, templates: str | None,
                  progress: gr.Progress = gr.Progress()) -> tuple[dict[str, float], str]:
        """Class probabilities for the image, and notes (downscaling, confusable labels)."""
        if self.encoder.has_text:
            names = parse_labels(labels)
            if templates not in TEMPLATE_SETS:
                raise gr.Error(f"Unknown template set {templates!r}: choose one of {', '.join(TEMPLATE_SETS)}.")
            img, note = read_upload(image)
            clf, warnings = self._classifier(tuple(names), templates, progress)
        elif self.prototypes is not None:
            img, note = read_upload(image)
            clf, warnings = self.prototypes, ""
        else:
            raise gr.Error(self.zero_shot_info)
        probs = clf.predict_proba([img])[0].tolist()
        return dict(zip(clf.classnames, probs)), "\n\n".join(t for t in (note, warnings) if t)

    @user_errors("text search")
    def search_text(self, query: str | None, k: float | None = None) -> tuple[list, list]:
        """Indexed images closest to a text query: gallery and table."""
        if not self.encoder.has_text:
            raise gr.Error(self.no_text)
        if not query or not query.strip():
            raise gr.Error("Type a text query, e.g. 'a dog running on the beach'.")
        if self.index is None:
            raise gr.Error(NO_INDEX)
        q = self.encoder.embed_text([query.strip()], normalize=True).numpy()  # (1, D)
        gallery, table, _ = self._results(q, k or self.k)
        return gallery, table

    @user_errors("image search")
    def search_image(self, image: dict | None, k: float | None = None) -> tuple[list, list, str]:
        """Indexed images closest to an uploaded image: gallery, table and notes."""
        if self.index is None:
            raise gr.Error(NO_INDEX)
        img, note = read_upload(image)
        gallery, table, _ = self._results(self.encoder.embed_images([img], normalize=True).numpy(), k or self.k)
        return gallery, table, note

    @user_errors("nearest neighbours")
    def neighbours(self, image: dict | None, k: float | None = None) -> tuple[list, dict | None, list, str]:
        """Nearest indexed images with their labels, the k-NN vote over those labels, table and notes."""
        if self.index is None:
            raise gr.Error(NO_INDEX)
        img, note = read_upload(image)
        q = self.encoder.embed_images([img], normalize=True).numpy()
        gallery, table, hits = self._results(q, k or self.k, label_first=True)
        votes: dict[str, float] = {}
        best = max(hit["score"] for hit in hits)  # subtracted before exp: the normalised weights are the same
        for hit in hits:
            label = hit.get("class") or hit.get("label")
            if label is not None:
                weight = float(np.exp((hit["score"] - best) / KNN_TEMPERATURE))
                votes[str(label)] = votes.get(str(label), 0.0) + weight
        total = sum(votes.values())
        vote = {c: v / total for c, v in votes.items()} if votes else None
        if vote is None:
            note = "\n\n".join(t for t in (note, "The index has no labels: no k-NN vote.") if t)
        return gallery, vote, table, note

    @user_errors("attention")
    def attention(self, image: dict | None, head: str | None) -> tuple[Image.Image, str]:
        """The last layer's class-token attention (mean of heads, or one head) over the image."""
        if self.no_attention:
            raise gr.Error(self.no_attention)
        choice = head or "mean"
        match = re.fullmatch(r"head (\d+)", choice)
        if choice != "mean" and (match is None or not 1 <= int(match.group(1)) <= self.heads):
            raise gr.Error(f"Choose 'mean' or 'head 1' … 'head {self.heads}', not {choice!r}.")
        img, note = read_upload(image)
        attn = attention_map(self.encoder, img, head=int(match.group(1)) - 1 if match else None)
        region = input_region(self.encoder, img)
        return overlay(region, attn), note
