"""The Gradio demo, served for real: through ``gradio_client``, headless Chromium, and ``sslhub demo``.

Two servers run for the module: a tiny open_clip CLIP over the Flickr8k sample's test split (100
images, embedded at start) and a tiny timm ViT without a text tower over the CIFAR-10 sample's test
split (500 labelled images: the few-shot tab). Every answer is compared with the same quantity
computed here from sslhub's API (zero-shot probabilities, search ranks and scores, k-NN vote, attention
image), and every bad input must come back as its message while the next request still works, logged
as one line, with the page's error closed by the next good result.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
from conftest import REPO, run_cli, stop_process  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from sslhub import load_encoder  # noqa: E402
from sslhub.apps.cli import build_parser, main  # noqa: E402
from sslhub.apps.demo import KNN_TEMPERATURE, PROMPT_BATCH, SHOTS, Backend, decode_size, launch  # noqa: E402
from sslhub.data.images import decode_all, open_image  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.inference.attention import attention_map, input_region, overlay  # noqa: E402
from sslhub.inference.zeroshot import (  # noqa: E402
    PrototypeClassifier,
    ZeroShotClassifier,
    check_labels,
)

FLICKR, CIFAR = REPO / "data" / "flickr8k-sample", REPO / "data" / "cifar10-sample"
EXAMPLES = REPO / "demos" / "examples"
DOG, KAYAK = EXAMPLES / "dog-snow.jpg", EXAMPLES / "kayak.jpg"
SCREENSHOT = REPO / "test-artifacts" / "demo.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def top_k(emb: torch.Tensor, query: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    scores, rows = (emb @ query[0]).topk(k)
    return rows.tolist(), scores.tolist()


def serve(encoder, data: Path) -> SimpleNamespace:
    """The demo over ``data``'s test split, a client, and the split embedded here (not by the demo)."""
    demo = launch(encoder, data=data, split="test", port=free_port(), block=False)
    decoded = decode_all(open_source(data, "test"), decode_size(encoder), progress=False)
    return SimpleNamespace(demo=demo, url=demo.local_url, encoder=encoder, client=Client(demo.local_url, verbose=False),
                           keys=decoded.keys, emb=encoder.embed_images(decoded.images, normalize=True),  # (N, D)
                           labels=decoded.labels.tolist(), classes=decoded.classes)


@pytest.fixture(scope="module")
def clip(open_clip_folder):
    app = serve(load_encoder(open_clip_folder[0]), FLICKR)
    yield app
    app.demo.close()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=2, num_classes=0)
    folder = tmp_path_factory.mktemp("vit")
    timm.models.save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval(), str(folder),
                            model_args=args, safe_serialization=True)
    app = serve(load_encoder(folder), CIFAR)
    yield app
    app.demo.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> SimpleNamespace:
    """Bad and awkward uploads: not an image (with a .jpg name), truncated, 20 MP, 100 MP (header only)."""
    d = tmp_path_factory.mktemp("uploads")
    (d / "notes.jpg").write_text("this is text, not a JPEG")
    (d / "truncated.jpg").write_bytes(DOG.read_bytes()[:1500])
    Image.open(DOG).resize((5472, 3648), Image.BILINEAR).save(d / "big.jpg", quality=80)  # 20.0 MP
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 10_000, 10_000) + png[24:29]  # claim 10000×10000 in the header, keep the rest
    png[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (d / "huge.png").write_bytes(bytes(png))
    return SimpleNamespace(**{p.stem: str(p) for p in d.iterdir()})


# ------------------------------------------------------------------------------------------- gradio_client
def test_serves_localhost_without_share_link(clip):
    assert clip.demo.server_name == "127.0.0.1" and not clip.demo.share
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and clip.demo.analytics_enabled is False
    api = clip.client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/zero_shot", "/search_text", "/search_image", "/neighbours", "/attention"}


def test_zero_shot(clip):
    labels = ["dog", "snow", "kayak", "a person"]
    out, _ = clip.client.predict(handle_file(str(DOG)), ", ".join(labels), "cifar", api_name="/zero_shot")
    expected = ZeroShotClassifier(clip.encoder, labels, "cifar").predict_proba([Image.open(DOG).convert("RGB")])[0]
    got = {c["label"]: c["confidence"] for c in out["confidences"]}
    assert got.keys() == set(labels)
    np.testing.assert_allclose([got[c] for c in labels], expected.tolist(), atol=1e-5)
    assert out["label"] == labels[int(expected.argmax())]


def test_zero_shot_shows_every_label(clip):
    labels = ["dog", "snow", "kayak", "a person", "tree", "car", "boat"]  # more than Gradio's usual top 5
    out, _ = clip.client.predict(handle_file(str(DOG)), ", ".join(labels), "default", api_name="/zero_shot")
    assert {c["label"] for c in out["confidences"]} == set(labels)


def test_zero_shot_progress_counts_prompts_with_the_time_left(clip, monkeypatch, tmp_path):
    """Labels × templates prompts are embedded batch by batch, each batch reported with the time left."""
    monkeypatch.setenv("SSLHUB_CACHE", str(tmp_path))  # no class matrix cached by an earlier run
    labels = [f"progress test thing {i}" for i in range(12)]
    total = len(labels) * 80  # imagenet templates: 960 prompts, 4 batches
    be, calls = Backend(clip.encoder), []
    out, _ = be.zero_shot({"path": str(DOG)}, ", ".join(labels), "imagenet",
                          progress=lambda fraction, desc=None: calls.append((fraction, desc)))
    batch_ends = [min(n, total) for n in range(PROMPT_BATCH, total + PROMPT_BATCH, PROMPT_BATCH)]
    assert [f for f, _ in calls] == [n / total for n in batch_ends]
    assert all(f"{n}/{total} prompts, " in d and d.endswith(" left") for n, (_, d) in zip(batch_ends, calls)), calls
    expected = ZeroShotClassifier(clip.encoder, labels, "imagenet", cache=False)  # the same class matrix
    np.testing.assert_allclose(list(out.values()), expected.predict_proba([Image.open(DOG).convert("RGB")])[0], atol=1e-6)
    again = []
    be.zero_shot({"path": str(DOG)}, ", ".join(labels), "imagenet", progress=lambda *a, **k: again.append(a))
    assert again == []  # kept from the first request: nothing to embed

    job = clip.client.submit(handle_file(str(DOG)), ", ".join(f"served {c}" for c in labels), "imagenet",
                             api_name="/zero_shot")  # the same through Gradio's gr.Progress
    seen = set()
    while not job.done():
        seen.update((u.progress, u.desc) for u in job.status().progress_data or [])
        time.sleep(0.01)
    job.result()
    assert any(desc and f"/{total} prompts" in desc and 0 < fraction < 1 for fraction, desc in seen), seen


def test_confusable_labels_are_flagged(clip):
    labels = ["dog", "snow", "kayak", "a person"]
    expected = [w["suggestion"] for w in check_labels(clip.encoder, labels, "cifar")]
    assert expected  # the tiny random text tower embeds some of these alike (cosine ≥ 0.9)
    _, notes = clip.client.predict(handle_file(str(DOG)), "\n".join(labels), "cifar", api_name="/zero_shot")
    assert notes.splitlines() == [f"- ⚠️ {s}" for s in expected]


def test_search_text(clip):
    gallery, table = clip.client.predict("a dog running in the snow", 5, api_name="/search_text")
    rows, scores = top_k(clip.emb, clip.encoder.embed_text(["a dog running in the snow"], normalize=True), 5)
    assert [r[4] for r in table["data"]] == [clip.keys[i] for i in rows]
    np.testing.assert_allclose([r[1] for r in table["data"]], scores, atol=1e-4)
    assert len(gallery) == 5 and all(g["caption"].startswith(f"{s:.3f}") for g, s in zip(gallery, scores))
    assert all(Path(g["image"]).is_file() for g in gallery)


def test_search_image_and_neighbours_without_labels(clip):
    query = clip.encoder.embed_images([Image.open(KAYAK).convert("RGB")], normalize=True)
    rows, scores = top_k(clip.emb, query, 3)
    gallery, table, notes = clip.client.predict(handle_file(str(KAYAK)), 3, api_name="/search_image")
    assert [r[4] for r in table["data"]] == [clip.keys[i] for i in rows] and len(gallery) == 3 and notes == ""
    np.testing.assert_allclose([r[1] for r in table["data"]], scores, atol=1e-4)
    gallery, vote, table, notes = clip.client.predict(handle_file(str(KAYAK)), 3, api_name="/neighbours")
    assert [r[4] for r in table["data"]] == [clip.keys[i] for i in rows]
    assert "no labels" in notes and not vote.get("confidences")


def test_attention_endpoint(vit):
    path, notes = vit.client.predict(handle_file(str(DOG)), "head 2", api_name="/attention")
    img = Image.open(DOG).convert("RGB")
    expected = overlay(input_region(vit.encoder, img), attention_map(vit.encoder, img, head=1))
    assert notes == "" and np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))


def best_classes(label_output: dict, expected: dict[str, float], shown: int) -> None:
    """A ``gr.Label`` answer (its ``shown`` best classes) against the expected probabilities of every class."""
    got = {c["label"]: c["confidence"] for c in label_output["confidences"]}
    best = sorted(expected, key=expected.get, reverse=True)[:shown]
    assert list(got) == best and label_output["label"] == best[0]
    np.testing.assert_allclose([got[c] for c in best], [expected[c] for c in best], atol=1e-5)


def test_few_shot_and_knn_vote_for_a_vision_only_model(vit):
    source = open_source(CIFAR, "test")
    examples: dict[str, list] = {}
    for s in source.samples:  # the demo's rule: the first SHOTS images of each class, in index order
        name = vit.classes[s.label]
        if len(examples.setdefault(name, [])) < SHOTS:
            examples[name].append(open_image(s.data, s.key))
    img = Image.open(DOG).convert("RGB")
    expected = PrototypeClassifier(vit.encoder, examples).predict_proba([img])[0].tolist()
    out, _ = vit.client.predict(handle_file(str(DOG)), "ignored", "default", api_name="/zero_shot")
    best_classes(out, dict(zip(examples, expected)), shown=len(examples))  # all 10 CIFAR classes

    rows, scores = top_k(vit.emb, vit.encoder.embed_images([img], normalize=True), 8)
    weights: dict[str, float] = {}
    names = [vit.classes[vit.labels[r]] for r in rows]
    for name, s in zip(names, scores):
        weights[name] = weights.get(name, 0.0) + math.exp(s / KNN_TEMPERATURE)
    gallery, vote, table, _ = vit.client.predict(handle_file(str(DOG)), 8, api_name="/neighbours")
    assert [r[2] for r in table["data"]] == names
    assert all(g["caption"].startswith(t[2]) for g, t in zip(gallery, table["data"]))
    best_classes(vote, {c: w / sum(weights.values()) for c, w in weights.items()}, shown=5)


def test_bad_input_is_a_message_and_the_server_keeps_serving(clip, vit, uploads):
    z = dict(api_name="/zero_shot")
    cases = [
        (clip, (handle_file(uploads.notes), "dog, cat", "default"), z, "notes.jpg is not an image"),
        (clip, (handle_file(uploads.truncated), "dog, cat", "default"), z, "truncated or damaged"),
        (clip, (handle_file(uploads.huge), "dog, cat", "default"), z, r"10000×10000 \(100 megapixels\)"),
        (clip, (handle_file(str(DOG)), " ,\n, ", "default"), z, "at least two labels"),
        (clip, (handle_file(str(DOG)), "dog, Dog", "default"), z, "repeats 'dog'"),
        (clip, (None, "dog, cat", "default"), z, "Upload an image first"),
        (clip, ("   ", 4), dict(api_name="/search_text"), "Type a text query"),
        (clip, (handle_file(str(DOG)), "head 9"), dict(api_name="/attention"), "Choose 'mean' or 'head 1'"),
        (vit, ("a dog", 4), dict(api_name="/search_text"), "has no text tower"),
    ]
    for app, args, kwargs, message in cases:
        with pytest.raises(AppError, match=message):
            app.client.predict(*args, **kwargs)
        out, _ = app.client.predict(handle_file(str(DOG)), "dog, cat", "default", **z)  # still serving
        labels = {c["label"] for c in out["confidences"]}
        assert labels == ({"dog", "cat"} if app is clip else set(vit.classes))


def test_user_error_is_one_log_line_not_a_traceback(clip, capfd, caplog):
    caplog.set_level(logging.INFO, logger="sslhub.apps.demo")
    capfd.readouterr()
    with pytest.raises(AppError, match="at least two labels"):
        clip.client.predict(handle_file(str(DOG)), "dog", "default", api_name="/zero_shot")
    with pytest.raises(AppError, match="Type a text query"):
        clip.client.predict("  ", 4, api_name="/search_text")
    console = capfd.readouterr()
    assert "Traceback" not in console.err + console.out, console.err[-3000:]
    lines = [r.getMessage() for r in caplog.records if r.name == "sslhub.apps.demo"]
    assert lines == ["user error in zero-shot: Type at least two labels, separated by commas or new lines "
                     "(e.g. dog, cat, bird).", "user error in text search: Type a text query, e.g. 'a dog running "
                     "on the beach'."]


def test_twenty_megapixels_are_downscaled(clip, uploads):
    out, notes = clip.client.predict(handle_file(uploads.big), "dog, cat", "default", api_name="/zero_shot")
    assert "big.jpg (5472×3648, 20.0 MP) was downscaled to 1024×683" in notes
    assert {c["label"] for c in out["confidences"]} == {"dog", "cat"}


# ------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _label_is(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#zs-label [data-testid=label-output-value]')"
                           "?.innerText === t", arg=text, timeout=30_000)


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#zs-image input[type=file]", state="attached")
    return page


def _classify(page, encoder, image: Path, labels: list[str]) -> str:
    """Upload, type, click; → the label the page must show (computed here with ZeroShotClassifier)."""
    page.set_input_files("#zs-image input[type=file]", str(image))
    page.fill("#zs-labels textarea", ", ".join(labels))
    page.click("#zs-run")
    probs = ZeroShotClassifier(encoder, labels).predict_proba([Image.open(image).convert("RGB")])[0]
    return labels[int(probs.argmax())]


def test_browser_zero_shot_and_text_search(clip, browser):
    page = _open(browser, clip.url)
    labels = ["dog", "cat", "bird", "snow", "kayak", "tree"]
    _label_is(page, _classify(page, clip.encoder, DOG, labels))
    assert page.locator("#zs-label .confidence-set").count() == len(labels)  # the 6th label too
    page.click("#tab-retrieval-button")
    page.fill("#rt-text textarea", "a dog running in the snow")
    page.click("#rt-text-run")
    page.wait_for_function("document.querySelectorAll('#rt-gallery .gallery-item').length === 8", timeout=30_000)
    page.wait_for_function("[...document.querySelectorAll('#rt-gallery img')].every(i => i.complete && i.naturalWidth)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    page.close()


def test_browser_bad_input_is_shown_and_the_page_keeps_working(clip, browser, uploads):
    page = _open(browser, clip.url)
    page.set_input_files("#zs-image input[type=file]", uploads.notes)  # a .jpg that is not an image
    page.click("#zs-run")
    page.locator(".toast-body", has_text="notes.jpg is not an image").wait_for(timeout=30_000)
    page.set_input_files("#zs-image input[type=file]", str(DOG))
    page.fill("#zs-labels textarea", " , ")
    page.click("#zs-run")
    page.locator(".toast-body", has_text="at least two labels").wait_for(timeout=30_000)
    _label_is(page, _classify(page, clip.encoder, KAYAK, ["boat", "horse", "mountain"]))
    # the good result closes both error toasts (Gradio keeps a stack of two until it is closed)
    page.wait_for_function("!document.querySelector('.toast-body.error')", timeout=5_000)
    page.close()


def test_vision_only_page_explains_missing_text_tower(vit, browser):
    page = browser.new_page()
    page.goto(vit.url)
    page.wait_for_selector("#zs-info")
    assert "few-shot" in page.inner_text("#zs-info") and not page.locator("#zs-labels").is_visible()
    page.click("#tab-retrieval-button")
    page.wait_for_selector("#rt-info")
    assert "has no text tower" in page.inner_text("#rt-info") and not page.locator("#rt-text").is_visible()
    page.close()


# ------------------------------------------------------------------------------------------- command line
def test_cli_flags():
    args = build_parser().parse_args(["demo", "M", "--data", "D"])
    assert (args.host, args.port, args.share, args.index, args.split) == ("127.0.0.1", None, False, None, "train")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "M", "--data", "D", "--index", "I"])


def test_cli_busy_port_is_one_line_naming_the_flag(open_clip_folder, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["demo", str(open_clip_folder[0]), "--data", str(FLICKR), "--split", "test", "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("sslhub: error: ") and len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "--port" in err and "server_port" not in err, err


def test_cli_serves_a_saved_index(open_clip_folder, tmp_path):
    folder = str(open_clip_folder[0])
    run_cli("index", "build", "--model", folder, "--data", str(FLICKR), "--split", "test",
            "--out", str(tmp_path / "index"), "--workers", "0")
    port, log = free_port(), tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sslhub", "demo", folder, "--index", str(tmp_path / "index"),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300  # a fresh process imports torch and gradio: slow on a busy machine
        while True:
            try:
                config = json.load(urllib.request.urlopen(url + "config", timeout=5))
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(1)
        assert config["title"] == "sslhub demo" and config["analytics_enabled"] is False
        gallery, table = Client(url, verbose=False).predict("a dog", 4, api_name="/search_text")
        assert len(table["data"]) == 4 and len(gallery) == 4  # the images come back from the recorded data
        printed = time.time() + 30
        while "--share" not in log.read_text():  # printed once the server is up
            assert time.time() < printed, log.read_text()[-2000:]
            time.sleep(0.2)
        console = log.read_text()
        assert f"sslhub demo: serving on http://127.0.0.1:{port}/" in console
        assert f"--index {tmp_path / 'index'} --port {port} --share" in console and "share=True" not in console
    finally:
        stop_process(proc)
