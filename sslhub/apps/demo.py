"""A Gradio demo for any encoder sslhub loads: zero-shot, retrieval, nearest neighbours, attention maps, and
reconstructions for masked-modeling exports.

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
- reconstruct (``/reconstruct``): for a masked-modeling export folder (MAE, SimMIM: ``config.json``'s
  ``sslhub.masked_modeling`` and ``mim_head.safetensors``), an image, a masking ratio (default the checkpoint's)
  and a seed → original | masked | reconstruction | reconstruction + visible patches, with the share of
  patches actually hidden (``sslhub.apps.demo_reconstruct``). Other models get the tab with a one-line
  explanation and no endpoint.

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

from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import gradio as gr  # noqa: E402

from sslhub.apps.demo_backend import (  # noqa: E402
    CLASSIFIERS,
    KNN_TEMPERATURE,
    MAX_LABELS,
    MAX_PIXELS,
    NO_INDEX,
    PROMPT_BATCH,
    SHOTS,
    THUMB_SIDE,
    WORK_SIDE,
    Backend,
    ReportingText,
    decode_size,
    index_data,
    index_folder,
    log,
    parse_labels,
    prompt_progress,
    read_upload,
    user_errors,
)
from sslhub.apps.demo_reconstruct import Reconstructor  # noqa: E402
from sslhub.apps.demo_serve import FIRST_PORT, _announce, _port_message, check_port, demo_command  # noqa: E402
from sslhub.inference.load import load_encoder  # noqa: E402
from sslhub.inference.loaders.base import Encoder  # noqa: E402
from sslhub.inference.retrieval import Index  # noqa: E402
from sslhub.inference.templates import TEMPLATE_SETS  # noqa: E402

# the page and launch are here; the computations (demo_backend) and the serving helpers (demo_serve) are
# re-exported, so ``from sslhub.apps.demo import Backend`` and the like keep working
__all__ = [
    "build_demo", "launch", "EXAMPLES", "CLEAR_ERRORS", "TABLE", "MAX_UPLOAD",
    "Backend", "ReportingText", "read_upload", "parse_labels", "user_errors", "prompt_progress",
    "decode_size", "index_data", "index_folder", "check_port", "demo_command", "log",
    "MAX_PIXELS", "WORK_SIDE", "MAX_LABELS", "PROMPT_BATCH", "CLASSIFIERS", "FIRST_PORT", "SHOTS",
    "KNN_TEMPERATURE", "THUMB_SIDE", "NO_INDEX", "Reconstructor",
]

MAX_UPLOAD = "50mb"  # Gradio refuses larger files before they reach the handlers
TABLE = ["rank", "score", "label", "caption", "id"]  # the result tables' columns
EXAMPLES = Path(__file__).resolve().parents[2] / "demos" / "examples"  # present in a source checkout
# run in the page after a request succeeds: close the error toasts still shown (see _clears_errors)
CLEAR_ERRORS = ("() => document.querySelectorAll('.toast-body.error [data-testid=toast-close]')"
                ".forEach(button => button.click())")


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

    ``model``: anything ``load_encoder`` takes, or an ``Encoder`` (a masked-modeling export folder, or an
    ``Encoder`` loaded from one, also gets the Reconstruct tab). ``index``: a saved index folder or an
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
    rec = Reconstructor.for_model(model, encoder)
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
            _reconstruct_tab(rec, files)
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


def _reconstruct_tab(rec: Reconstructor, files: Sequence[Path]) -> None:
    with gr.Tab("Reconstruct", elem_id="tab-reconstruct"):
        gr.Markdown(f"Reconstruction is not available: {rec.unavailable}" if rec.unavailable else
                    f"{rec.title} hides a share of the image's patches and paints them back from the visible "
                    "ones: original | masked input | reconstruction | reconstruction with the visible patches "
                    "pasted back.", elem_id="rc-info")
        if rec.unavailable:
            return  # no endpoint: /reconstruct exists only where a model can reconstruct
        with gr.Row():
            with gr.Column():
                image = _image_input("rc-image")
                low, high = rec.ratio_range
                ratio = gr.Slider(low, high, value=rec.default_ratio, step=0.01, label="masking ratio (share of "
                                  "patches hidden)", elem_id="rc-ratio")
                seed = gr.Number(0, precision=0, minimum=0, label="seed (which patches are hidden)", elem_id="rc-seed")
                run = gr.Button("Reconstruct", variant="primary", elem_id="rc-run")
                _examples(files, image)
            with gr.Column(scale=2):
                out = gr.Image(label="original | masked | reconstruction | reconstruction + visible", type="pil",
                               format="png", elem_id="rc-output", height=360)
                notes = gr.Markdown(label="notes", elem_id="rc-notes")
    _clears_errors(run.click(rec.reconstruct, [image, ratio, seed], [out, notes], api_name="reconstruct",
                             preprocess=False))


# ------------------------------------------------------------------------------------------- serve
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
