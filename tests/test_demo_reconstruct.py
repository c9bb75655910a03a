"""The demo's Reconstruct tab for masked-modeling exports: the backend against the method's own panels, the
endpoint through ``gradio_client``, one headless-Chromium session, and its absence for other models.

The export is a real one: ``sslhub train recipes/mae_imagenette.yaml`` for two steps on a tiny ViT (32-px images,
4-px patches: an 8x8 grid, L = 64) over the bundled Imagenette-96 sample.
"""
from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urljoin

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
import gradio as gr  # noqa: E402
from conftest import REPO, TINY_VIT_ENCODER, run_cli  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_demo import CHROMIUM_ARGS, free_port  # noqa: E402

from sslhub import load_encoder  # noqa: E402
from sslhub.apps.demo import build_demo, launch  # noqa: E402
from sslhub.apps.demo_reconstruct import DISPLAY_SIDE, NO_HEAD, Reconstructor, masked_modeling_folder  # noqa: E402
from sslhub.errors import InputError  # noqa: E402
from sslhub.inference.attention import input_region  # noqa: E402
from sslhub.methods.simmim import SimMIM  # noqa: E402
from sslhub.publish.pictures import image_grid  # noqa: E402
from sslhub.train.recipe import recipe_from_dict  # noqa: E402

IMAGENETTE = REPO / "data" / "imagenette96-sample"
SIDE, L = 32, 64  # the tiny export's input side and patches (8x8 grid of 4-px patches)
PANEL = SIDE * -(-DISPLAY_SIDE // SIDE)  # each panel enlarged by a whole factor: 224 px
PNG_SIZE = (4 * (PANEL + 4) + 4, 16 + PANEL + 4 + 4)  # image_grid: 4 columns, one row, 4-px padding, 16-px titles
HIDDEN = re.compile(r"\*\*(\d+)/(\d+) patches hidden\*\*")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae")
    run_cli("train", str(REPO / "recipes" / "mae_imagenette.yaml"), "--out", str(out), "--set", "train.max_steps=2",
            "--set", "data.batch_size=16", "--set", "data.num_workers=0", "--set", f"encoder.image_size={SIDE}",
            "--set", "encoder.model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
            "--set", f"method_args.views.size={SIDE}", "--set", "method_args.decoder_dim=32",
            "--set", "method_args.decoder_depth=1", "--set", "method_args.decoder_heads=2", "--set", "eval.knn.test=")
    return out / "export"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Two JPEGs of the Imagenette sample (96 px, not square), taken out of the validation shard."""
    d = tmp_path_factory.mktemp("photos")
    with tarfile.open(IMAGENETTE / "val-00000.tar.gz") as tar:
        for name in ("val_000000.jpg", "val_000001.jpg"):
            (d / name).write_bytes(tar.extractfile(name).read())
    return [str(d / "val_000000.jpg"), str(d / "val_000001.jpg")]


@pytest.fixture(scope="module")
def rec(export) -> Reconstructor:
    r = Reconstructor.for_model(str(export), load_encoder(export))
    assert r.unavailable is None and r.method.name == "mae" and r.method.n_patches == L
    return r


def panels_of(picture: Image.Image) -> list[np.ndarray]:
    """The four panels of the picture (one row under 16-px titles), as ``(PANEL, PANEL, 3)`` arrays."""
    a = np.asarray(picture.convert("RGB"))
    return [a[16 : 16 + PANEL, 4 + j * (PANEL + 4) : 4 + j * (PANEL + 4) + PANEL] for j in range(4)]


def grey_patches(panel: np.ndarray) -> int:
    """Patches of the masked panel painted the uniform grey of a hidden patch."""
    cell = PANEL // 8
    grid = panel.reshape(8, cell, 8, cell, 3).transpose(0, 2, 1, 3, 4).reshape(L, -1).astype(int)
    return int(((grid >= 127) & (grid <= 128)).all(1).sum())


def hidden_in(note: str) -> tuple[int, int]:
    match = HIDDEN.search(note)
    assert match, note
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------------------------------- backend
def test_reconstruction_is_the_methods_own_at_the_chosen_ratio(rec, photos):
    """The picture is image_grid of the method's reconstruction_panels for the model's view of the upload, with the
    mask the method draws at the slider's ratio from the seed."""
    picture, note = rec.reconstruct({"path": photos[0]}, 0.4, 7)
    assert picture.size == PNG_SIZE
    region = input_region(rec.encoder, Image.open(photos[0]).convert("RGB")).resize((SIDE, SIDE), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1)[None]
    mask = rec.method.mask_at(1, 0.4, torch.Generator().manual_seed(7))
    panels = rec.method.reconstruction_panels(x, mask)
    expected = Image.open(io.BytesIO(image_grid(panels, ["original", "masked 41%", "reconstruction",
                                                         "recon. + visible"], min_side=DISPLAY_SIDE)))
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected.convert("RGB")))
    original, _, reconstruction, pasted = panels_of(picture)
    assert not np.array_equal(reconstruction, original) and not np.array_equal(pasted, original)
    assert hidden_in(note) == (round(0.4 * L), L) == (int(mask.sum()), L)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75, 0.95])
def test_the_note_and_the_picture_hide_round_ratio_L_patches(rec, photos, ratio):
    picture, note = rec.reconstruct({"path": photos[1]}, ratio, 0)
    hidden, total = hidden_in(note)
    assert (hidden, total) == (round(ratio * L), L)
    assert f"share {hidden / total:.4g}" in note and "MAE" in note
    assert grey_patches(panels_of(picture)[1]) == hidden  # the masked panel shows as many grey patches


def test_the_seed_chooses_the_patches(rec, photos):
    a, _ = rec.reconstruct({"path": photos[0]}, 0.5, 1)
    b, _ = rec.reconstruct({"path": photos[0]}, 0.5, 2)
    again, _ = rec.reconstruct({"path": photos[0]}, 0.5, 1)
    assert not np.array_equal(panels_of(a)[1], panels_of(b)[1])
    assert np.array_equal(np.asarray(a), np.asarray(again))
    assert np.array_equal(panels_of(a)[0], panels_of(b)[0])  # the same original


def test_defaults_are_the_checkpoints_ratio_and_seed_0(rec, photos):
    assert rec.default_ratio == 0.75 and rec.ratio_range == (0.1, 0.95)
    picture, note = rec.reconstruct({"path": photos[0]}, None, None)
    assert hidden_in(note) == (48, L) and "seed 0" in note
    assert np.array_equal(np.asarray(picture), np.asarray(rec.reconstruct({"path": photos[0]}, 0.75, 0)[0]))


@pytest.mark.parametrize("ratio, message", [
    (0.0, r"masking ratio of 0\.0 is not in \(0, 1\)"),
    (1.0, r"masking ratio of 1\.0 is not in \(0, 1\)"),
    (0.995, r"hides 64 of the 64 patches; a mask must hide at least one and leave one visible"),
    (0.005, r"hides 0 of the 64 patches"),
    ("lots", r"masking ratio must be a number"),
    (float("nan"), r"finite number"),
])
def test_a_bad_ratio_is_a_clear_error(rec, photos, ratio, message):
    with pytest.raises(gr.Error, match=message):
        rec.reconstruct({"path": photos[0]}, ratio, 0)


def test_bad_seed_and_missing_image_are_clear_errors(rec, photos):
    with pytest.raises(gr.Error, match="seed must be a whole number"):
        rec.reconstruct({"path": photos[0]}, 0.5, 1.5)
    with pytest.raises(gr.Error, match="Upload an image first"):
        rec.reconstruct(None, 0.5, 0)


def test_simmim_masks_whole_cells_at_the_chosen_ratio():
    """``mask_at`` draws as ``draw_mask`` does (SimMIM: cells of 2x2 patches), at another ratio."""
    r = recipe_from_dict({"method": "simmim", "encoder": {**TINY_VIT_ENCODER, "image_size": 32},
                          "method_args": {"views": {"size": 32}}})
    m = SimMIM.create(r.encoder, r.method_args).eval()  # 8x8 patches, 4x4 cells, ratio 0.6
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(m.draw_mask(5, g()), m.mask_at(5, 0.6, g()))
    mask = m.mask_at(5, 0.25, g())
    assert (mask.sum(1) == round(0.25 * 16) * 4).all()
    with pytest.raises(InputError, match="hides 16 of the 16 mask cells"):
        m.mask_at(1, 0.98, g())


# ------------------------------------------------------------------------------------------- other models
def test_other_models_get_no_reconstruction(export, tmp_path):
    import timm

    headless = tmp_path / "no-head"
    shutil.copytree(export, headless)
    (headless / "mim_head.safetensors").unlink()
    assert masked_modeling_folder(export) == export and masked_modeling_folder(f"local-dir:{export}") == export
    assert masked_modeling_folder(headless) is None  # the encoder alone: no head to reconstruct with
    assert masked_modeling_folder(load_encoder(export)) == export  # an Encoder knows the folder it came from
    broken = tmp_path / "broken-head"
    shutil.copytree(export, broken)
    (broken / "mim_head.safetensors").write_bytes(b"not a safetensors file")
    unavailable = Reconstructor.for_model(str(broken), load_encoder(broken)).unavailable
    assert unavailable.startswith(f"the reconstruction head in {broken} cannot be loaded")
    resnet = tmp_path / "resnet18"
    timm.models.save_for_hf(timm.create_model("resnet18", pretrained=False, num_classes=0).eval(), str(resnet),
                            model_args={"num_classes": 0}, safe_serialization=True)
    for folder in (resnet, headless):
        demo = build_demo(str(folder))
        config = demo.get_config_file()
        info = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "rc-info"]
        assert info == [f"Reconstruction is not available: {NO_HEAD}"]
        assert NO_HEAD.startswith("this checkpoint has no reconstruction head")
        assert "reconstruct" not in {f.api_name for f in demo.fns.values()}
        assert not any(c["props"].get("elem_id") == "rc-run" for c in config["components"])
        with pytest.raises(gr.Error, match="not available"):
            Reconstructor.for_model(str(folder), load_encoder(folder)).reconstruct(None, 0.5, 0)


# ------------------------------------------------------------------------------------------- served
@pytest.fixture(scope="module")
def served(export):
    demo = launch(str(export), port=free_port(), block=False)
    yield SimpleNamespace(demo=demo, url=demo.local_url, client=Client(demo.local_url, verbose=False))
    demo.close()


def test_endpoint_through_gradio_client(served, rec, photos):
    api = served.client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/reconstruct" in api and "/attention" in api
    path, note = served.client.predict(handle_file(photos[1]), 0.3, 5, api_name="/reconstruct")
    expected, expected_note = rec.reconstruct({"path": photos[1]}, 0.3, 5)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and note == expected_note
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected.convert("RGB")))
    with pytest.raises(AppError, match="hides 64 of the 64 patches"):
        served.client.predict(handle_file(photos[1]), 0.999, 5, api_name="/reconstruct")


def test_browser_reconstruct_tab(served, rec, photos):
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(served.url)
            page.click("#tab-reconstruct-button")
            page.wait_for_selector("#rc-image input[type=file]", state="attached")
            assert "MAE" in page.inner_text("#rc-info")
            assert page.input_value("#rc-ratio input[type=number]") == "0.75"  # the checkpoint's ratio
            page.set_input_files("#rc-image input[type=file]", photos[0])
            page.fill("#rc-seed input", "3")
            page.click("#rc-run")
            page.wait_for_function("document.querySelector('#rc-output img')?.naturalWidth > 0", timeout=30_000)
            src = page.get_attribute("#rc-output img", "src")
            body = page.request.get(urljoin(page.url, src)).body()
            assert body[:8] == b"\x89PNG\r\n\x1a\n"
            shown = Image.open(io.BytesIO(body))
            assert shown.size == PNG_SIZE
            expected, _ = rec.reconstruct({"path": photos[0]}, 0.75, 3)
            assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.convert("RGB")))
            page.wait_for_function("t => document.querySelector('#rc-notes')?.innerText.includes(t)",
                                   arg="48/64 patches hidden", timeout=10_000)
        finally:
            browser.close()
