"""A Gradio demo for any encoder sslhub loads: zero-shot, retrieval, nearest neighbours, attention maps.

    sslhub demo open_clip:ViT-B-32/laion2b_s34b_b79k --data data/flickr8k-sample
    sslhub demo runs/quickstart/export --data data/cifar10-sample --split test
    python demos/app.py MODEL --index runs/index

    demo = build_demo("runs/simclr/export", data="data/cifar10-sample")   # a gr.Blocks
    launch("runs/simclr/export", index="runs/index", port=7860)          # serves until Ctrl-C

Tabs (each endpoint has an ``api_name`` for ``gradio_client``):
- zero-shot (``/zero_shot``): an image, labels, a template set → class probabilities, with the prompt
  check's warnings for labels the text tower can hardly tell apart. A model without a text tower gets
  a few-shot prototype classifier over the index's labels instead, or an explanation.
- retrieval (``/search_text``, ``/search_image``): text → images and image → images over the index.
- nearest neighbours (``/neighbours``): the closest indexed images with their labels and a
  similarity-weighted k-NN vote.
- attention (``/attention``): for ViT encoders, the last layer's class-token attention over the image
  (``sslhub.inference.attention``).

The index is a saved folder (``sslhub index build``) or a data set embedded at start (``data=``).
Safety: binds 127.0.0.1 unless told otherwise, no share link unless asked, Gradio analytics off (set
before gradio is imported), uploads ≤ 50 MB and ≤ 50 megapixels, larger images downscaled to 1024 px
(JPEGs decoded at reduced scale), a bounded queue. Bad input is a message in the page, not a crash,
and one line in the server's log, not a traceback; a good result clears the error messages before it.
Zero-shot reports its prompt embedding (labels × templates) as it goes, with the time left.
"""
from __future__ import annotations

import os

from sslhub.errors import InputError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no calls to outside hosts

import functools  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
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
from sslhub.inference.load import load_encoder  # noqa: E402
from sslhub.inference.loaders.base import Encoder  # noqa: E402
from sslhub.inference.retrieval import Index, build_index, load_index  # noqa: E402
from sslhub.inference.templates import TEMPLATE_SETS  # noqa: E402
from sslhub.inference.zeroshot import (  # noqa: E402
    PrototypeClassifier,
    ZeroShotClassifier,
    check_labels,
)

log = logging.getLogger("sslhub.apps.demo")

MAX_PIXELS = 50_000_000  # refused above this: decoding alone would take ≥ 150 MB per request
WORK_SIDE = 1024  # uploads are downscaled to this longest side (every encoder's input is far smaller)
MAX_UPLOAD = "50mb"  # Gradio refuses larger files before they reach the handlers
MAX_LABELS = 100  # zero-shot embeds labels × templates prompts (imagenet: 80 templates)
PROMPT_BATCH = 256  # prompts per text-tower batch (embed_text's default): one progress step each
CLASSIFIERS = 64  # zero-shot classifiers (label sets × template sets) kept in memory
FIRST_PORT = 7860  # Gradio's first port when none is given
SHOTS = 16  # few-shot prototype classifier: images per class taken from the index
KNN_TEMPERATURE = 0.07  # k-NN vote weights exp(similarity / T), the DINO / InstDisc k-NN protocol
THUMB_SIDE = 256  # gallery thumbnails
TABLE = ["rank", "score", "label", "caption", "id"]  # the result tables' columns
EXAMPLES = Path(__file__).resolve().parents[2] / "demos" / "examples"  # present in a source checkout
# run in the page after a request succeeds: close the error toasts still shown (see _clears_errors)
CLEAR_ERRORS = ("() => document.querySelectorAll('.toast-body.error [data-testid=toast-close]')"
                ".forEach(button => button.click())")
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


# ------------------------------------------------------------------------------------------- page
def _image_input(elem_id: str, label: str = "image") -> gr.Image:
    return gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                    elem_id=elem_id, height=280)


def _examples(files: Sequence[Path], target: gr.Image) -> None:
    if files:
        gr.Examples([[str(f)] for f in files], inputs=[target], label="examples")


def _clears_errors(event: Any) -> None:
    """When ``event`` succeeds, close the error toasts still on the page.

    Gradio shows an error toast for 10 s, and two or more until the visitor closes them, so an old
    "not an image" stayed beside the next, good result as if it were about that one.
    """
    event.success(None, js=CLEAR_ERRORS)


def build_demo(model: str | Path | Encoder, index: str | Path | Index | None = None, data: str | Path | None = None,
               *, split: str = "train", k: int = 8, examples: Sequence[str | Path] | None = None,
               concurrency: int = 2, max_queue: int = 64, workers: int = 0) -> gr.Blocks:
    """The demo as a queued ``gr.Blocks`` (not yet launched).

    ``model``: anything ``load_encoder`` takes, or an ``Encoder``. ``index``: a saved index folder or an
    ``Index``; ``data`` (instead): a data set embedded now (``split`` of shards, ``workers`` decoding
    processes). ``examples``: example image files (default: ``demos/examples`` of a source checkout).
    ``concurrency`` requests run at once, up to ``max_queue`` more wait; beyond that Gradio answers
    "queue full".
    """
    if index is not None and data is not None:
        raise InputError("give index= (a saved index) or data= (embedded now), not both")
    encoder = model if isinstance(model, Encoder) else load_encoder(model)
    samples: list = []
    if isinstance(index, Index):
        idx = index
    elif index is not None:
        idx, samples = index_folder(encoder, index)
    elif data is not None:
        idx, samples = index_data(encoder, data, split, workers)
    else:
        idx = None
    be = Backend(encoder, idx, samples, k)
    files = [Path(f) for f in examples] if examples is not None else sorted(EXAMPLES.glob("*.jpg"))
    where = (f"{len(idx)} images of `{idx.info.get('data', 'the index')}`" if idx is not None else "no index")
    with gr.Blocks(title="sslhub demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## sslhub demo\n`{be.name}` — {encoder.kind}, {encoder.dim}-d, "
                    f"{'image + text' if encoder.has_text else 'image only'}; index: {where}", elem_id="header")
        with gr.Tabs():
            _zero_shot_tab(be, files)
            _retrieval_tab(be, files, k)
            _neighbours_tab(be, files, k)
            _attention_tab(be, files)
    return demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)


def _zero_shot_tab(be: Backend, files: Sequence[Path]) -> None:
    text, few_shot = be.encoder.has_text, be.prototypes is not None
    with gr.Tab("Zero-shot" if text or not few_shot else "Few-shot", elem_id="tab-zeroshot"):
        gr.Markdown(be.zero_shot_info, visible=not text, elem_id="zs-info")
        with gr.Row():
            with gr.Column():
                image = _image_input("zs-image")
                labels = gr.Textbox(label="labels (comma or new line separated)", lines=2, visible=text,
                                    value="dog, cat, bird, person, car", elem_id="zs-labels")
                templates = gr.Dropdown(list(TEMPLATE_SETS), value="default", label="prompt templates",
                                        visible=text, elem_id="zs-templates")
                run = gr.Button("Classify", variant="primary", visible=text or few_shot, elem_id="zs-run")
            with gr.Column():
                # every label typed (parse_labels takes up to MAX_LABELS); a few-shot index: its first MAX_LABELS
                label = gr.Label(num_top_classes=MAX_LABELS, label="probabilities", elem_id="zs-label")
                notes = gr.Markdown(label="notes", elem_id="zs-notes")
        _examples(files, image)
    _clears_errors(run.click(be.zero_shot, [image, labels, templates], [label, notes], api_name="zero_shot",
                             preprocess=False))


def _retrieval_tab(be: Backend, files: Sequence[Path], k: int) -> None:
    with gr.Tab("Retrieval", elem_id="tab-retrieval"):
        gr.Markdown(NO_INDEX if be.index is None else be.no_text, visible=be.index is None or not be.encoder.has_text,
                    elem_id="rt-info")
        with gr.Row():
            with gr.Column():
                query = gr.Textbox(label="text query", placeholder="a dog running on the beach",
                                   visible=be.encoder.has_text, elem_id="rt-text")
                by_text = gr.Button("Search by text", variant="primary", visible=be.encoder.has_text,
                                    elem_id="rt-text-run")
                image = _image_input("rt-image", "image query")
                by_image = gr.Button("Search by image", elem_id="rt-image-run")
                count = gr.Slider(1, 32, value=k, step=1, label="results", elem_id="rt-k")
                _examples(files, image)
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="results (similarity)", columns=4, elem_id="rt-gallery")
                notes = gr.Markdown(label="notes", elem_id="rt-notes")
                table = gr.Dataframe(headers=TABLE, label="table", elem_id="rt-table")
    _clears_errors(gr.on([by_text.click, query.submit], be.search_text, [query, count], [gallery, table],
                         api_name="search_text", preprocess=False))
    _clears_errors(by_image.click(be.search_image, [image, count], [gallery, table, notes], api_name="search_image",
                                  preprocess=False))


def _neighbours_tab(be: Backend, files: Sequence[Path], k: int) -> None:
    with gr.Tab("Nearest neighbours", elem_id="tab-neighbours"):
        gr.Markdown(NO_INDEX, visible=be.index is None, elem_id="nn-info")
        with gr.Row():
            with gr.Column():
                image = _image_input("nn-image")
                count = gr.Slider(1, 32, value=k, step=1, label="neighbours", elem_id="nn-k")
                run = gr.Button("Find neighbours", variant="primary", elem_id="nn-run")
                vote = gr.Label(num_top_classes=5, label="k-NN vote over their labels", elem_id="nn-vote")
                _examples(files, image)
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="neighbours (label · similarity)", columns=4, elem_id="nn-gallery")
                notes = gr.Markdown(label="notes", elem_id="nn-notes")
                table = gr.Dataframe(headers=TABLE, label="table", elem_id="nn-table")
    _clears_errors(run.click(be.neighbours, [image, count], [gallery, vote, table, notes], api_name="neighbours",
                             preprocess=False))


def _attention_tab(be: Backend, files: Sequence[Path]) -> None:
    with gr.Tab("Attention", elem_id="tab-attention"):
        gr.Markdown(f"Attention maps are not available: {be.no_attention}" if be.no_attention else
                    "The last layer's attention from the class token to each patch (DINO, Caron et al. 2021), "
                    "over the part of the image the model sees.", elem_id="at-info")
        with gr.Row(visible=be.no_attention is None):
            with gr.Column():
                image = _image_input("at-image")
                head = gr.Dropdown(["mean"] + [f"head {i}" for i in range(1, be.heads + 1)], value="mean",
                                   label="heads", elem_id="at-head")
                run = gr.Button("Show attention", variant="primary", elem_id="at-run")
                _examples(files, image)
            with gr.Column():
                out = gr.Image(label="attention", type="pil", format="png", elem_id="at-output", height=360)
                notes = gr.Markdown(label="notes", elem_id="at-notes")
    _clears_errors(run.click(be.attention, [image, head], [out, notes], api_name="attention", preprocess=False))


# ------------------------------------------------------------------------------------------- serve
def check_port(host: str, port: int) -> None:
    """``InputError`` naming ``--port`` when ``host:port`` cannot be bound (another server holds it).

    Checked before the model loads and the data is embedded (minutes for a large ``--data``), and in
    sslhub's words: Gradio's own error advises its ``server_port`` argument and an environment variable.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise InputError(_port_message(host, port, e.strerror or str(e))) from None


def _port_message(host: str, port: int | None, reason: str) -> str:
    if port is None:
        return (f"cannot serve on {host} at any port from {FIRST_PORT} ({reason}): choose a free one with --port, "
                "and check --host")
    return (f"cannot serve on {host}:{port} ({reason}): choose another port with --port, or leave --port out "
            f"to take the first free one from {FIRST_PORT}")


def demo_command(model: Any, index: Any = None, data: Any = None, split: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None) -> str:
    """The ``sslhub demo`` command line that serves this demo (``MODEL`` for an ``Encoder`` object)."""
    args = ["sslhub", "demo", str(model) if isinstance(model, (str, Path)) else "MODEL"]
    if isinstance(index, (str, Path)):
        args += ["--index", str(index)]
    if data is not None:
        args += ["--data", str(data)]
    if split not in (None, "train"):
        args += ["--split", split]
    if host != "127.0.0.1":
        args += ["--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return shlex.join(args)


def _announce(demo: gr.Blocks, command: str, share: bool) -> None:
    """Where the demo is served, in sslhub's words, on stderr.

    Gradio's own lines (hidden by ``quiet=True``) say "set `share=True` in `launch()`", which a
    ``sslhub demo`` user never calls. Gradio still prints the public link itself when there is one.
    """
    print(f"sslhub demo: serving on {demo.local_url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    if not share:
        print(f"sslhub demo: for a public *.gradio.live link too, run {command} --share", file=sys.stderr, flush=True)


def launch(model: str | Path | Encoder, index: str | Path | None = None, data: str | Path | None = None, *,
           host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True,
           **options: Any) -> gr.Blocks:
    """Build the demo and serve it on ``host:port`` (default 127.0.0.1, a free port from 7860).

    ``share=True`` asks Gradio for a public link (off by default). ``block=False`` returns at once with
    the server running in a background thread (``demo.close()`` stops it) and prints nothing;
    ``options`` go to ``build_demo``. A port that cannot be served raises ``InputError`` naming ``--port``
    (given a ``port``, before anything loads).
    """
    if port is not None:
        check_port(host, port)
    demo = build_demo(model, index, data, **options)
    try:
        demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, max_file_size=MAX_UPLOAD,
                    prevent_thread_lock=True, quiet=True)
    except OSError as e:  # Gradio's "Cannot find empty port …": taken since check_port, or none free from 7860
        raise InputError(_port_message(host, port, "in use")) from e
    if block:
        _announce(demo, demo_command(model, index, data, options.get("split"), host, port), share)
        demo.block_thread()
    return demo
