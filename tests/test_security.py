"""Hostile input: pickles are never unpickled, Hub file names never leave the cache, bombs are not decoded.

1. Pickles. A model folder of each layout ``load_encoder`` reads (an sslhub export, timm's, open_clip's,
   transformers') gets pickle files beside its safetensors, under every name a library looks for; each
   pickle's unpickling would create a sentinel file. A *tripwire* makes the worst case real: whatever is
   handed to ``torch.load`` is recorded and unpickled with ``weights_only=False`` (as an older library, or
   one that passes ``weights_only=False``, would) — so a pickle handed over at all creates its sentinel.
   The folders load with the safetensors weights (features equal the model's own), ``torch.load`` is never
   called, no sentinel exists. A folder with only pickles, a folder whose only safetensors is not the
   layout's own, and a config whose ``model_args`` name a ``checkpoint_path`` are refused the same way.
   From the test Hub, a repo with a pickle beside its safetensors loads without the pickle being fetched.
2. Hub file names. A repo (on the test Hub of ``tests/hub_server.py``, seeded without its path checks,
   as a hostile Hub would list them) holding an absolute name, a backslash name or a ``..`` part is
   refused before anything is downloaded; ``unsafe_name`` is checked on a list of names too.
3. Decompression bombs in training data — a PNG declaring 30000x30000 pixels (PIL raises) and one of
   15000x15000 (over ``Image.MAX_IMAGE_PIXELS`` but under twice it: PIL only warns, then decodes 225 MB and
   more) — are skipped and counted, named in the warning, without being decoded; ``embed_images`` refuses one.
4. Modes: LA, PA, P (with and without transparency, with a per-entry alpha), and grey / RGB PNGs with a
   transparent colour decode to 3 channels with the expected values (palette colours; transparency on
   white) in training data, and ``encoder.preprocess`` / ``embed_images`` treat them the same way for each
   family.
"""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslhub import load_encoder
from sslhub.data.images import BadImage, decode_all
from sslhub.data.sources import open_source
from sslhub.inference.loaders.base import LoadError

ATOL = 1e-5


# ================================================================================================ pickles
class Payload:
    """A checkpoint's hostile code: unpickling this creates the file ``path`` (``open(path, "w")``)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# every name timm, open_clip or transformers looks for, and the other pickle suffixes sslhub knows
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "pytorch_model.pth",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth.tar", "model.ckpt",
                "model.pkl")


def plant_pickle(folder: Path, name: str, sentinels: Path) -> Path:
    """``folder/name``: a torch.save (zip) or plain pickle whose unpickling creates ``sentinels/name``."""
    sentinels.mkdir(exist_ok=True)
    payload = {"state_dict": Payload(sentinels / name)}
    if name.endswith(".pkl"):
        with open(folder / name, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, folder / name)
    return folder / name


def plant_pickles(folder: Path, sentinels: Path, names=PICKLE_NAMES) -> None:
    for name in names:
        plant_pickle(folder, name, sentinels)


def fired(sentinels: Path) -> list[str]:
    return sorted(p.name for p in sentinels.iterdir()) if sentinels.is_dir() else []


def load_unrun(name, tripwire: list[str], sentinels: Path):
    """``load_encoder(name)`` → (encoder or None, the exception or None), after checking that no pickle
    reached ``torch.load`` and none ran — whatever the outcome."""
    enc = err = None
    try:
        enc = load_encoder(name)
    except Exception as e:  # checked by the caller, after the checks that matter most
        err = e
    assert tripwire == [], f"torch.load was handed {tripwire}"
    assert fired(sentinels) == [], f"unpickled: {fired(sentinels)}"
    return enc, err


def assert_refused(err, pattern: str) -> None:
    assert isinstance(err, LoadError), f"expected a LoadError, got {err!r}"
    assert re.search(pattern, str(err), re.DOTALL), str(err)


@pytest.fixture
def tripwire(monkeypatch) -> list[str]:
    """Every ``torch.load`` is recorded and unpickles with ``weights_only=False``: the files it was given."""
    seen: list[str] = []
    real = torch.load

    def unsafe_load(f, *args, **kwargs):
        seen.append(str(f))
        kwargs["weights_only"] = False
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", unsafe_load)
    monkeypatch.setattr(torch.serialization, "load", unsafe_load)
    return seen


def test_planted_pickles_run_their_code_when_loaded(tmp_path, tripwire):
    """The sentinels do detect a pickle that reaches ``torch.load`` (or ``pickle.load``)."""
    sentinels = tmp_path / "sentinels"
    plant_pickles(tmp_path, sentinels)
    assert fired(sentinels) == []
    for name in PICKLE_NAMES:
        if name.endswith(".pkl"):
            with open(tmp_path / name, "rb") as f:
                pickle.load(f)
        else:
            torch.load(tmp_path / name, map_location="cpu", weights_only=True)  # forced off by the tripwire
    assert fired(sentinels) == sorted(PICKLE_NAMES)


# ---- one folder per layout, with a reference forward: x (B, 3, 32, 32) normalised → (B, dim)
def _sslhub_export(folder: Path):
    from sslhub.models.backbone import Backbone, EncoderConfig
    from sslhub.publish.export import export_encoder

    torch.manual_seed(0)
    backbone = Backbone(EncoderConfig(arch="resnet18", cifar_stem=True, image_size=32,
                                      model_args={"channels": [8, 8, 8, 8]})).eval()
    export_encoder(backbone, folder, {"method": "simclr", "steps": 0})
    return backbone


def _timm_folder(folder: Path):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def _open_clip_folder(folder: Path, open_clip_folder):
    src, model, _, _ = open_clip_folder
    shutil.copytree(src, folder, dirs_exist_ok=True)
    return model.encode_image


def _transformers_folder(folder: Path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64), add_pooling_layer=False).eval()
    model.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return lambda x: model(pixel_values=x).last_hidden_state[:, 0]


LAYOUTS = ("sslhub", "timm", "open_clip", "transformers")


@pytest.fixture
def layout_folder(request, tmp_path, open_clip_folder):
    """``(layout, folder, reference forward)`` for ``request.param``."""
    layout = request.param
    folder = tmp_path / layout
    folder.mkdir()
    ref = {"sslhub": lambda: _sslhub_export(folder), "timm": lambda: _timm_folder(folder),
           "open_clip": lambda: _open_clip_folder(folder, open_clip_folder),
           "transformers": lambda: _transformers_folder(folder)}[layout]()
    return layout, folder, ref


@pytest.mark.parametrize("layout_folder", LAYOUTS, indirect=True)
def test_pickles_beside_safetensors_are_never_unpickled(layout_folder, tmp_path, tripwire):
    layout, folder, ref = layout_folder
    sentinels = tmp_path / "sentinels"
    plant_pickles(folder, sentinels)
    enc, err = load_unrun(folder, tripwire, sentinels)
    assert err is None, repr(err)
    assert enc.kind == layout
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.embed_images(x), ref(x), atol=ATOL)  # the safetensors weights
    assert fired(sentinels) == []



@pytest.mark.parametrize("config, body, pickles", [
    ("config.json", {"architecture": "resnet18", "num_classes": 0}, PICKLE_NAMES),  # timm
    ("config.json", {"model_type": "vit", "image_size": 32}, PICKLE_NAMES),  # transformers
    ("open_clip_config.json", None, PICKLE_NAMES),  # open_clip (the test CLIP's config)
    (None, None, ("model.pt",)),  # no config at all
])
def test_pickle_only_folders_are_refused_without_unpickling(tmp_path, tripwire, open_clip_folder, config, body,
                                                             pickles):
    folder, sentinels = tmp_path / "model", tmp_path / "sentinels"
    folder.mkdir()
    if config == "open_clip_config.json":
        shutil.copy(open_clip_folder[0] / config, folder / config)
    elif config:
        (folder / config).write_text(json.dumps(body))
    plant_pickles(folder, sentinels, pickles)
    _, err = load_unrun(folder, tripwire, sentinels)
    assert_refused(err, r"pickle files only \(.*\); sslhub loads safetensors only.*weights_only")


def test_open_clip_config_with_a_foreign_safetensors_and_an_open_clip_pickle(tmp_path, tripwire, open_clip_folder):
    """open_clip's own folder loader prefers open_clip_pytorch_model.bin to model.safetensors: refused."""
    folder, sentinels = tmp_path / "model", tmp_path / "sentinels"
    shutil.copytree(open_clip_folder[0], folder)
    (folder / "open_clip_model.safetensors").rename(folder / "model.safetensors")  # not open_clip's name
    plant_pickle(folder, "open_clip_pytorch_model.bin", sentinels)
    _, err = load_unrun(folder, tripwire, sentinels)
    assert_refused(err, r"pickle files only \(open_clip_pytorch_model.bin\).*open_clip_model.safetensors")


@pytest.mark.parametrize("layout", ["sslhub", "timm"])
@pytest.mark.parametrize("arg", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_config_model_args_cannot_name_a_checkpoint(tmp_path, tripwire, layout, arg):
    """timm.create_model(arch, **model_args) would torch.load a checkpoint_path the config names."""
    folder, sentinels = tmp_path / "model", tmp_path / "sentinels"
    if layout == "sslhub":
        _sslhub_export(folder)
    else:
        folder.mkdir()
        _timm_folder(folder)
    evil = plant_pickle(tmp_path, "evil.pth", sentinels)  # outside the folder, named by absolute path
    value = str(evil) if arg == "checkpoint_path" else {"file": str(evil), "source": ""}
    config = json.loads((folder / "config.json").read_text())
    args = config["sslhub"]["encoder"]["model_args"] if layout == "sslhub" else config["model_args"]
    args[arg] = value
    (folder / "config.json").write_text(json.dumps(config))
    _, err = load_unrun(folder, tripwire, sentinels)
    assert_refused(err, f"model_args sets {arg}, which would make timm load weights")


# ============================================================================================ Hub file names
USER = "sslhub-test"
TOKEN = "hf_sslhubSecurityTestToken0123456789"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The test Hub of tests/hub_server.py on 127.0.0.1, with huggingface_hub pointed at it."""
    from hub_server import running_hub

    with running_hub(tmp_path_factory.mktemp("hub"), {TOKEN: USER}) as server:
        yield server


@pytest.fixture
def cache(hub, tmp_path):
    from hub_server import client_env

    with client_env(HF_HUB_CACHE=str(tmp_path / "hf_cache")):
        yield tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """A timm-layout folder's files (name → bytes) and its reference forward."""
    folder = tmp_path_factory.mktemp("timm_files")
    ref = _timm_folder(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}, ref


@pytest.mark.parametrize("hostile", [
    "{tmp}/escape.json",  # absolute
    "..\\escape.json",  # a Windows parent-folder path
    "a\\b.json",  # a backslash: a separator on Windows
    "..\\..\\..\\escape.safetensors",
    "C:escape.json",  # a drive-relative Windows path
    "../escape.json",
    "a/../../escape.json",
    "./config.json",
    "a//b.json",
])
def test_hub_repo_listing_unsafe_file_names_is_refused(hub, cache, tmp_path, timm_files, hostile):
    files, _ = timm_files
    hostile = hostile.format(tmp=tmp_path)
    repo = f"{USER}/hostile-{zlib.crc32(hostile.encode()):08x}"
    hub.seed(repo, {**files, hostile: b"{}"})
    n = len(hub.requests)
    with pytest.raises(LoadError, match=r"unsafe file names \(" + re.escape(repr(hostile)) + r"\).*nothing is "
                                        "downloaded"):
        load_encoder(f"hf-hub:{repo}")
    assert not [r for r in hub.requests[n:] if "/resolve/" in r[1]]  # not one file was fetched
    assert not list(cache.glob("models--*/snapshots/*/*"))
    assert not list(tmp_path.glob("escape*")) and not list(cache.parent.rglob("escape*"))


def test_unsafe_name_list():
    from sslhub.inference.loaders.hub import unsafe_name

    for name in ("/etc/x", "/x.json", "..\\x", "a\\b", "a\\..\\..\\b.json", "..", "../x", "a/../b", "a/..",
                 "./a", "a/./b", "a//b", "a/", "", "C:x", "c:/x", "C:\\x", "a\0b"):
        assert unsafe_name(name), name
    for name in ("config.json", "model.safetensors", "text_config/config.json", "a/b/c.txt", "..x", "x..",
                 "a..b/c", ".gitattributes", "a/.hidden", "tokenizer.json", "ab:c.json"):
        assert not unsafe_name(name), name


def test_hub_repo_with_a_pickle_beside_safetensors_loads_without_fetching_it(hub, cache, tmp_path, timm_files,
                                                                             tripwire):
    files, ref = timm_files
    sentinels = tmp_path / "sentinels"
    planted = tmp_path / "planted"
    planted.mkdir()
    plant_pickles(planted, sentinels, ("pytorch_model.bin", "model.pth", "open_clip_pytorch_model.bin"))
    repo = f"{USER}/pickle-beside"
    hub.seed(repo, {**files, **{p.name: p.read_bytes() for p in planted.iterdir()}})
    enc, err = load_unrun(f"hf-hub:{repo}", tripwire, sentinels)
    assert err is None, repr(err)
    assert enc.kind == "timm"
    snapshot = sorted(p.name for p in cache.glob("models--*/snapshots/*/*"))
    assert "model.safetensors" in snapshot and not [n for n in snapshot if n.endswith((".bin", ".pth"))]
    assert not list(cache.rglob("*.bin")) and not list(cache.rglob("*.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.embed_images(x), ref(x), atol=ATOL)


# =================================================================================== decompression bombs
def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit greyscale PNG of ``width x height``: ~0.1 % of the bytes it decodes to."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z, parts, left = zlib.compressobj(6), [], height
    while left:
        n = min(left, max(1, 8_000_000 // len(row)))
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs():
    """900 MP (PIL raises: over twice Image.MAX_IMAGE_PIXELS) and 225 MP (PIL only warns, then decodes)."""
    big, mid = bomb_png(30000, 30000), bomb_png(15000, 15000)
    assert len(big) < 1_000_000 and len(mid) < 1_000_000
    assert 2 * Image.MAX_IMAGE_PIXELS >= 15000 ** 2 > Image.MAX_IMAGE_PIXELS  # the range PIL only warns in
    return {"bomb_900mp.png": big, "bomb_225mp.png": mid}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_in_a_folder_are_skipped_and_counted(tmp_path, bombs, caplog):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 10, 10)).save(d / f"good{i}.png")
    for name, data in bombs.items():
        (d / name).write_bytes(data)
    t = time.time()
    with caplog.at_level(logging.WARNING, logger="sslhub.data"):
        dec = decode_all(open_source(d), 32, progress=False)
    assert time.time() - t < 20  # nothing was decoded at full size
    assert len(dec) == 3 and sorted(Path(k).name for k in dec.keys) == ["good0.png", "good1.png", "good2.png"]
    assert len(dec.skipped) == 2
    assert "skipped 2 unreadable sample(s)" in caplog.text
    for name in bombs:
        assert name in caplog.text and "decompression bomb" in next(s for s in dec.skipped if name in s)
    assert "declares 15000x15000 pixels (225 MP), over the 200 MP limit" in caplog.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_in_a_shard_are_skipped_and_counted(tmp_path, bombs, caplog):
    shard = tmp_path / "train-00000.tar"
    members = {"ok1.png": _png_bytes(Image.new("RGB", (32, 32), (1, 2, 3))), "ok1.cls": b"0",
               "ok2.png": _png_bytes(Image.new("RGB", (32, 32), (4, 5, 6))), "ok2.cls": b"1"}
    for name, data in bombs.items():
        members[name] = data
        members[name.replace(".png", ".cls")] = b"1"
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="sslhub.data"):
        dec = decode_all(open_source(shard), 32, progress=False)
    assert len(dec) == 2 and dec.labels.tolist() == [0, 1]
    assert "skipped 2 unreadable sample(s)" in caplog.text
    assert "train-00000.tar:bomb_900mp" in caplog.text and "train-00000.tar:bomb_225mp" in caplog.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_embed_images_refuses_a_decompression_bomb(tmp_path, bombs):
    (tmp_path / "timm").mkdir()
    _timm_folder(tmp_path / "timm")
    enc = load_encoder(tmp_path / "timm")
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage, match=f"cannot embed .*{name}.*decompression bomb"):
            enc.embed_images([tmp_path / name])


# ========================================================================================= odd image modes
PALETTE = [(10, 20, 30), (200, 100, 50), (0, 255, 0)]
WHITE = (255, 255, 255)


def _indices(n: int = 32) -> np.ndarray:
    """(n, n) palette indices: top half 0, bottom-left 1, bottom-right 2."""
    idx = np.zeros((n, n), np.uint8)
    idx[n // 2:, : n // 2], idx[n // 2:, n // 2:] = 1, 2
    return idx


def _palette_image(n: int = 32) -> Image.Image:
    img = Image.fromarray(_indices(n), "P")
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return img


def _expected(colors, n: int = 32) -> np.ndarray:
    """(n, n, 3) uint8: index i of _indices → colors[i]."""
    return np.array(colors, np.uint8)[_indices(n)]


def mode_cases(n: int = 32) -> dict[str, tuple[Image.Image, np.ndarray, int]]:
    """name → (image, expected RGB (n, n, 3), tolerance): each mode with the values it must decode to."""
    cases = {}
    cases["P"] = (_palette_image(n), _expected(PALETTE, n), 0)
    p_trns = _palette_image(n)
    p_trns.info["transparency"] = 1  # entry 1 transparent → white
    cases["P+transparency"] = (p_trns, _expected([PALETTE[0], WHITE, PALETTE[2]], n), 0)
    p_alpha = _palette_image(n)
    p_alpha.info["transparency"] = bytes([255, 0, 128])  # per-entry alpha (PNG tRNS)
    half = tuple(round(c * 128 / 255 + 255 * 127 / 255) for c in PALETTE[2])
    cases["P+alpha"] = (p_alpha, _expected([PALETTE[0], WHITE, half], n), 1)
    grey, alpha = np.full((n, n), 100, np.uint8), np.where(_indices(n) == 1, 0, 255).astype(np.uint8)
    alpha[_indices(n) == 2] = 128
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    cases["LA"] = (la, _expected([(100,) * 3, WHITE, (177,) * 3], n), 1)  # 100*128/255 + 255*127/255 = 177.2
    pa = _palette_image(n).convert("PA")
    pa.putalpha(Image.fromarray(np.where(_indices(n) == 2, 0, 255).astype(np.uint8), "L"))
    cases["PA"] = (pa, _expected([PALETTE[0], PALETTE[1], WHITE], n), 0)
    l_trns = Image.fromarray(np.where(_indices(n) == 1, 150, 77).astype(np.uint8), "L")
    l_trns.info["transparency"] = 150  # a grey PNG's transparent value
    cases["L+transparency"] = (l_trns, _expected([(77,) * 3, WHITE, (77,) * 3], n), 0)
    rgb_trns = Image.fromarray(_expected(PALETTE, n), "RGB")
    rgb_trns.info["transparency"] = PALETTE[0]  # an RGB PNG's transparent colour
    cases["RGB+transparency"] = (rgb_trns, _expected([WHITE, PALETTE[1], PALETTE[2]], n), 0)
    return cases


def _save(img: Image.Image, path: Path) -> None:
    if "transparency" in img.info:
        img.save(path, transparency=img.info["transparency"])
    else:
        img.save(path)


def test_modes_decode_to_rgb_in_training_data(tmp_path):
    wrong = []
    cases = mode_cases()
    for name, (img, want, tol) in cases.items():
        if img.mode == "PA":  # no file format stores PA
            continue
        path = tmp_path / f"{name}.png"
        _save(img, path)
        assert Image.open(path).mode == img.mode, name  # the file keeps the mode under test
        got = decode_all(open_source(path), 32, progress=False).images[0]  # (3, 32, 32) uint8
        assert got.shape == (3, 32, 32), name
        diff = (got.permute(1, 2, 0).int() - torch.from_numpy(want).int()).abs().max().item()
        if diff > tol:
            wrong.append(f"{name}: off by {diff}")
    gif = tmp_path / "P+transparency.gif"  # GIF: a palette image with a transparent index
    cases["P+transparency"][0].save(gif, transparency=1)
    got = decode_all(open_source(gif), 32, progress=False).images[0].permute(1, 2, 0).numpy()
    if not (got == cases["P+transparency"][1]).all():
        wrong.append("P+transparency.gif")
    assert not wrong, "; ".join(wrong)


@pytest.mark.parametrize("layout_folder", ["sslhub", "timm", "open_clip", "transformers"], indirect=True)
def test_modes_become_the_same_rgb_at_inference(layout_folder, tmp_path):
    """``encoder.preprocess`` and ``embed_images`` (PIL and path) see each mode as its expected RGB image."""
    _, folder, _ = layout_folder
    enc = load_encoder(folder)
    wrong = []
    for name, (img, want, tol) in mode_cases().items():
        if tol:  # partial alpha: compared in the training-data test (rounding differs by 1)
            continue
        rgb = Image.fromarray(want, "RGB")
        ref = enc.preprocess(rgb)
        try:
            x = enc.preprocess(img)
        except RuntimeError as e:  # a transform given 1 or 2 channels
            wrong.append(f"{name}: preprocess failed ({e})")
            continue
        if x.shape != ref.shape or not torch.allclose(x, ref, atol=ATOL):
            wrong.append(f"{name}: preprocess gives other values (shape {tuple(x.shape)}) than for the RGB image")
            continue
        feats = enc.embed_images([img, rgb])
        if not torch.allclose(feats[0], feats[1], atol=ATOL):
            wrong.append(f"{name}: embed_images differs")
        if img.mode != "PA":
            _save(img, tmp_path / f"{name}.png")
            if not torch.allclose(enc.embed_images([tmp_path / f"{name}.png"])[0], feats[1], atol=ATOL):
                wrong.append(f"{name}.png: embed_images differs")
    assert not wrong, "; ".join(wrong)
