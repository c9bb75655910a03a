"""``load_encoder`` over every source form that works offline, against each library's own forward.

Tiny models are built here and saved in each layout (timm ``save_for_hf``, open_clip's Hub layout,
transformers ``save_pretrained``); the loaded encoder's embeddings must equal the native forward
(atol 1e-5). The ``hf-hub:`` download itself is exercised elsewhere against a local Hub server; here
its name parsing and its offline failure are checked. Nothing is downloaded.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sslhub import load_encoder
from sslhub.inference.loaders.base import LoadError

ATOL = 1e-5
TEXTS = ["a cat", "a photo of a cat", "cat", "a small photo of a big cat on a mat, at night", "", "at a cat"]


@pytest.fixture(scope="module")
def pil_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 48), (32, 32), (57, 35))]


@pytest.fixture(scope="module")
def offline(request):
    """huggingface_hub in offline mode (it reads HF_HUB_OFFLINE at import, so set its flag too)."""
    from huggingface_hub import constants

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    yield
    mp.undo()


# ---------------------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    folder = tmp_path_factory.mktemp("timm")
    timm.models.save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder, model


@pytest.mark.parametrize("form", ["{}", "local-dir:{}"])
def test_timm_folder(timm_folder, pil_images, form):
    import timm.data

    folder, model = timm_folder
    enc = load_encoder(form.format(folder))
    assert enc.kind == "timm" and enc.dim == 192 and enc.image_size == 32
    assert not enc.has_text and enc.tokenizer is None and enc.logit_scale is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)  # (4, 192) timm's pooled features
    assert torch.allclose(enc.embed_images(x), ref, atol=ATOL)
    # PIL images go through timm's own eval transform, as save_for_hf recorded it in config.json
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 0.9
    tf = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))
    with torch.no_grad():
        x_pil = torch.stack([tf(im) for im in pil_images])  # (3, 3, 32, 32)
        ref_pil = model.forward_head(model.forward_features(x_pil), pre_logits=True)
    assert torch.allclose(enc.embed_images(pil_images, batch_size=2), ref_pil, atol=ATOL)
    assert enc.crop_pct == pytest.approx(0.9) and enc.interpolation == "bicubic"
    with pytest.raises(TypeError, match="no text tower"):
        enc.embed_text(["a cat"])


# ------------------------------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("form", ["{}", "local-dir:{}"])
def test_open_clip_folder(open_clip_folder, pil_images, form):
    folder, model, preprocess, tokenizer = open_clip_folder
    enc = load_encoder(form.format(folder))
    assert enc.kind == "open_clip" and enc.dim == 32 and enc.image_size == 32 and enc.has_text
    assert enc.tokenizer is not None and enc.trims_text, enc.trim_reason
    assert enc.logit_scale == pytest.approx(model.logit_scale.exp().item())
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([preprocess(im) for im in pil_images]))  # (3, 32)
        ref_txt = model.encode_text(tokenizer(TEXTS))  # (6, 32), full 77-token context
    assert torch.allclose(enc.embed_images(pil_images), ref_img, atol=ATOL)
    assert torch.allclose(enc.embed_text(TEXTS, batch_size=4), ref_txt, atol=ATOL)  # sorted, trimmed, unsorted
    assert torch.allclose(enc.embed_text(TEXTS, normalize=True), torch.nn.functional.normalize(ref_txt, dim=-1),
                          atol=ATOL)
    assert enc.embed_text("a cat").shape == (1, 32)
    assert enc.trims_text, enc.trim_reason  # the runtime check agreed: text really ran trimmed


def test_trimmed_text_equals_encode_text(open_clip_folder):
    from sslhub.inference.loaders.open_clip_encoder import (
        encode_text_trimmed,
        trim_unsupported_reason,
    )

    _, model, _, tokenizer = open_clip_folder
    ids = tokenizer(TEXTS)  # (6, 77)
    assert trim_unsupported_reason(model) is None
    with torch.no_grad():
        full, trimmed = model.encode_text(ids), encode_text_trimmed(model, ids)
        # the check can fail: cutting one token before the EOT changes the features
        cut = ids.clone()
        cut[torch.arange(len(TEXTS)), ids.argmax(-1)] = 0
        cut[torch.arange(len(TEXTS)), ids.argmax(-1) - 1] = ids.max()
        moved = encode_text_trimmed(model, cut)
    assert torch.allclose(trimmed, full, atol=ATOL)
    assert not torch.allclose(moved, full, atol=1e-3)
    model.text_pool_type = "last"  # not pooled at one token: must not be trimmed
    try:
        assert "pooling" in trim_unsupported_reason(model)
    finally:
        model.text_pool_type = "argmax"


def test_trim_runtime_check_falls_back(open_clip_folder):
    folder, model, _, tokenizer = open_clip_folder
    enc = load_encoder(folder)
    ids = tokenizer(TEXTS[:2])
    with pytest.warns(UserWarning, match="differ from encode_text"):
        enc._check_trim(ids, torch.zeros(2, 32))
    assert not enc.trims_text
    with torch.no_grad():
        assert torch.allclose(enc.embed_text(TEXTS[:2]), model.encode_text(ids), atol=ATOL)


# ------------------------------------------------------------------------------------- transformers
def _clip_tokenizer(folder):
    """A tiny CLIP BPE vocabulary written here (every byte, every byte + "</w>", a few merges)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("a", "t"), ("a", "t</w>"), ("c", "at</w>")]
    for t in ("at", "at</w>", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(folder))
    return len(vocab)


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf_clip")
    vocab = _clip_tokenizer(folder)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, max_position_embeddings=64, bos_token_id=vocab - 2,
                                      eos_token_id=vocab - 1, pad_token_id=vocab - 1, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder, model


def test_transformers_clip_folder(hf_clip_folder, pil_images):
    from transformers import AutoImageProcessor, AutoTokenizer

    from sslhub.inference.loaders.transformers_encoder import _pooled

    folder, model = hf_clip_folder
    enc = load_encoder(f"local-dir:{folder}")
    assert enc.kind == "transformers" and enc.dim == 16 and enc.image_size == 32 and enc.has_text
    assert enc.logit_scale == pytest.approx(model.logit_scale.exp().item())
    proc, tok = AutoImageProcessor.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        ref_img = _pooled(model.get_image_features(**proc(images=pil_images, return_tensors="pt")))
        ref_txt = _pooled(model.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")))
    assert ref_img.shape == (3, 16) and ref_txt.shape == (6, 16)
    assert torch.allclose(enc.embed_images(pil_images), ref_img, atol=ATOL)
    assert torch.allclose(enc.embed_text(TEXTS, batch_size=4), ref_txt, atol=ATOL)


@pytest.fixture(scope="module")
def hf_vision_folders(tmp_path_factory):
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        ViTImageProcessor,
        ViTMAEConfig,
        ViTMAEForPreTraining,
    )

    small = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    dino, mae = Dinov2Model(Dinov2Config(mlp_ratio=2, **small)).eval(), ViTMAEForPreTraining(ViTMAEConfig(
        intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_intermediate_size=64,
        decoder_num_attention_heads=2, **small)).eval()
    dino_dir, mae_dir = tmp_path_factory.mktemp("dinov2"), tmp_path_factory.mktemp("vit_mae")
    dino.save_pretrained(str(dino_dir))
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                      do_convert_rgb=True).save_pretrained(str(dino_dir))
    mae.save_pretrained(str(mae_dir))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(mae_dir))
    return dino_dir, dino, mae_dir, mae


def test_transformers_dinov2_and_mae(hf_vision_folders, pil_images):
    from transformers import AutoImageProcessor

    dino_dir, dino, mae_dir, mae = hf_vision_folders
    enc = load_encoder(dino_dir)
    assert enc.kind == "transformers" and enc.dim == 32 and enc.image_size == 32 and not enc.has_text
    assert enc.crop_pct == pytest.approx(32 / 36)
    x = AutoImageProcessor.from_pretrained(str(dino_dir))(images=pil_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = dino(pixel_values=x).pooler_output  # (3, 32) DINOv2's normed CLS token
    assert torch.allclose(enc.embed_images(pil_images), ref, atol=ATOL)

    enc = load_encoder(mae_dir)  # saved from ViTMAEForPreTraining: the encoder half is loaded
    assert enc.dim == 32
    x = torch.randn(2, 3, 32, 32)
    mae.config.mask_ratio = 0.0
    with torch.no_grad():
        ref = mae.vit(pixel_values=x).last_hidden_state[:, 1:].mean(1)  # random patch order: the mean ignores it
    assert torch.allclose(enc.embed_images(x), ref, atol=ATOL)


# ------------------------------------------------------------------------------------------- hf-hub
def test_hub_id_parsing():
    from sslhub.inference.loaders.hub import parse_hub_id

    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("timm/vit_small.dino@refs/pr/1") == ("timm/vit_small.dino", "refs/pr/1")
    for bad in ("name", "org/", "a/b/c", "org/name@", "org/na me"):
        with pytest.raises(LoadError, match="hf-hub"):
            parse_hub_id(bad)


def test_hub_snapshot_goes_through_folder_logic(timm_folder, monkeypatch):
    """The hf-hub: path with huggingface_hub's calls stubbed: pinned revision, no pickles fetched."""
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling

    from sslhub.inference.loaders import hub

    folder, model = timm_folder
    calls = {}

    def model_info(self, repo_id, revision=None, timeout=None):
        calls["info"] = (repo_id, revision)
        names = ["config.json", "model.safetensors", "pytorch_model.bin"] if "good" in repo_id else ["model.bin"]
        return type("Info", (), {"sha": "abc123", "siblings": [RepoSibling(rfilename=n) for n in names]})()

    def snapshot_download(repo_id, revision=None, allow_patterns=None, etag_timeout=None):
        calls["snapshot"] = (repo_id, revision, allow_patterns)
        return str(folder)

    monkeypatch.setattr(hub, "_reachable", lambda url, timeout=0: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    enc = load_encoder("hf-hub:org/good-model@v1")
    assert enc.kind == "timm" and enc.name == "hf-hub:org/good-model@v1"
    assert calls["info"] == ("org/good-model", "v1") and calls["snapshot"][:2] == ("org/good-model", "abc123")
    assert "*.safetensors" in calls["snapshot"][2] and not any("bin" in p for p in calls["snapshot"][2])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc.embed_images(x), model.forward_head(model.forward_features(x), pre_logits=True),
                              atol=ATOL)
    calls.clear()
    with pytest.raises(LoadError, match=r"pickle files only \(model.bin\)"):
        load_encoder("hf-hub:org/pickled-model")
    assert "snapshot" not in calls  # refused before downloading anything


def test_hub_offline_fails_fast(offline):
    t = time.time()
    with pytest.raises(LoadError, match="(?s)could not be downloaded.*local-dir:DIR"):
        load_encoder("hf-hub:sslhub-test/no-such-model@main")
    assert time.time() - t < 10


def test_unreachable_endpoint_switches_to_offline(monkeypatch):
    from huggingface_hub import constants

    from sslhub.inference.loaders import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachable", lambda url, timeout=0: False)
    with pytest.raises(LoadError, match="could not be downloaded"):
        load_encoder("hf-hub:sslhub-test/no-such-model")
    assert constants.HF_HUB_OFFLINE is False  # restored


# -------------------------------------------------------------------------------------- bad inputs
def test_bad_names(tmp_path, offline):
    with pytest.raises(LoadError, match="(?s)unknown prefix 'foo:'.*accepted forms"):
        load_encoder("foo:bar")
    with pytest.raises(LoadError, match="(?s)no such folder.*accepted forms"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(LoadError, match="no such folder"):
        load_encoder(f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="(?s)not a model.*notes.txt"):
        load_encoder(tmp_path)
    with pytest.raises(LoadError, match="a file, not a folder"):
        load_encoder(tmp_path / "notes.txt")
    with pytest.raises(LoadError, match="pretrained=False only applies"):
        load_encoder(tmp_path, pretrained=False)


@pytest.mark.parametrize("config, weights", [
    ("config.json", "pytorch_model.bin"),
    ("open_clip_config.json", "open_clip_pytorch_model.bin"),
])
def test_pickle_only_folder_refused(tmp_path, config, weights):
    body = {"architecture": "resnet18"} if config == "config.json" else {"model_cfg": {"embed_dim": 8}}
    (tmp_path / config).write_text(json.dumps(body))
    (tmp_path / weights).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LoadError, match=f"(?s)pickle files only \\({weights}\\).*weights_only=True.*save_file"):
        load_encoder(tmp_path)


def test_unsupported_transformers_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="(?s)model_type 'bert'.*supported: clip"):
        load_encoder(tmp_path)


def test_library_names_offline(offline):
    t = time.time()
    with pytest.raises(LoadError, match="(?s)timm:resnet18: the weights could not be downloaded.*local-dir:DIR"):
        load_encoder("timm:resnet18")
    with pytest.raises(LoadError, match="not a timm architecture"):
        load_encoder("timm:resnet_does_not_exist")
    with pytest.raises(LoadError, match="(?s)pretrained tags.*open_clip:ViT-B-32/"):
        load_encoder("open_clip:ViT-B-32")
    with pytest.raises(LoadError, match="could not be downloaded"):
        load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert time.time() - t < 20
    enc = load_encoder("timm:resnet18", pretrained=False)  # the architecture only
    assert enc.kind == "timm" and enc.dim == 512 and enc.image_size == 224
    assert enc.embed_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 512)
