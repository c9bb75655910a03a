"""``sslhub.inference.attention``: the last block's class-token attention, against a computation written out here.

The reference runs the model's token pipeline up to the last block, then computes softmax(q kᵀ / √d)
from the block's own projection weights by hand; ``attention_heads`` (a pre-hook during
``embed_images`` plus a recomputation) must match it for timm ViTs (with and without register tokens,
saved and reloaded through ``load_encoder``), for open_clip towers on a timm ViT trunk, and for
open_clip's own ViT towers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslhub import load_encoder
from sslhub.inference.attention import (
    AttentionUnsupported,
    attention_heads,
    attention_map,
    input_region,
    num_heads,
    overlay,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "demos" / "examples" / "dog-snow.jpg"


def _cls_attention(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int,
                   prefix: int) -> np.ndarray:
    """``tokens (1, N, C)`` (the attention's normalised input) → ``(heads, N - prefix)`` class-token rows."""
    n, c = tokens.shape[1], tokens.shape[2]
    qkv = tokens[0] @ weight.T + (bias if bias is not None else 0)  # (N, 3C): q, k, v side by side
    q = qkv[:, :c].reshape(n, heads, c // heads).transpose(0, 1)  # (h, N, d)
    k = qkv[:, c : 2 * c].reshape(n, heads, c // heads).transpose(0, 1)
    scores = (q @ k.transpose(1, 2)) / math.sqrt(c // heads)  # (h, N, N)
    return scores.softmax(-1)[:, 0, prefix:].numpy()


def _timm_reference(vit, x: torch.Tensor, heads: int) -> np.ndarray:
    """A timm ViT's token pipeline up to its last block, then ``_cls_attention`` from that block's qkv weights."""
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))  # (1, prefix + patches, C)
        for block in vit.blocks[:-1]:
            t = block(t)
        last = vit.blocks[-1]
        return _cls_attention(last.norm1(t), last.attn.qkv.weight, last.attn.qkv.bias, heads, vit.num_prefix_tokens)


@pytest.fixture(scope="module")
def image():
    return Image.open(EXAMPLE).convert("RGB").crop((0, 10, 128, 110))  # not square: exercises the crop


# dynamic_img_size: DINO's ViT recipe (its local crops are smaller than the global ones)
@pytest.mark.parametrize("reg_tokens, dynamic", [(0, False), (4, False), (0, True)])
def test_timm_vit_matches_manual(tmp_path, image, reg_tokens, dynamic):
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, depth=2, reg_tokens=reg_tokens, num_classes=0, dynamic_img_size=dynamic)
    timm.models.save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval(),
                            str(tmp_path), model_args=args, safe_serialization=True)
    enc = load_encoder(tmp_path)  # a timm Hub-layout folder
    assert enc.model.num_prefix_tokens == 1 + reg_tokens
    x = enc.preprocess(image)[None]
    g = x.shape[-1] // 8  # 4 (32 px); a dynamic-size folder is served at timm's default 224 px: 28
    assert g == (28 if dynamic else 4)
    ref = _timm_reference(enc.model, x, 3)
    heads = attention_heads(enc, image)
    assert heads.shape == (3, g, g) and num_heads(enc) == 3
    np.testing.assert_allclose(heads.reshape(3, -1), ref, atol=1e-6)
    np.testing.assert_allclose(attention_map(enc, image), ref.mean(0).reshape(g, g), atol=1e-6)
    np.testing.assert_allclose(attention_map(enc, image, head=2), ref[2].reshape(g, g), atol=1e-6)
    with pytest.raises(ValueError, match="head must be in 0..2"):
        attention_map(enc, image, head=3)


def test_open_clip_vit_matches_manual(open_clip_folder, image):
    enc = load_encoder(open_clip_folder[0])
    visual = enc.model.visual
    with torch.no_grad():
        t = visual._embeds(enc.preprocess(image)[None])  # (1, 1 + 16, W) after ln_pre
        for block in visual.transformer.resblocks[:-1]:
            t = block(t)
        last = visual.transformer.resblocks[-1]
        ref = _cls_attention(last.ln_1(t), last.attn.in_proj_weight, last.attn.in_proj_bias, 2, 1)
    heads = attention_heads(enc, image)
    assert heads.shape == (2, 4, 4)
    np.testing.assert_allclose(heads.reshape(2, -1), ref, atol=1e-6)


def test_open_clip_tower_on_a_timm_vit_trunk(tmp_path, image):
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    pp = {"size": 224, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    enc = load_encoder(tmp_path)
    ref = _timm_reference(enc.model.visual.trunk, enc.preprocess(image)[None], 3)
    heads = attention_heads(enc, image)
    assert heads.shape == (3, 14, 14)
    np.testing.assert_allclose(heads.reshape(3, -1), ref, atol=1e-6)


def test_not_a_vit_is_refused():
    enc = load_encoder("timm:resnet18", pretrained=False)
    with pytest.raises(AttentionUnsupported, match="need a vision transformer; .* is a ResNet"):
        attention_map(enc, Image.new("RGB", (40, 40)))


def test_region_and_overlay(open_clip_folder, image):
    enc = load_encoder(open_clip_folder[0])  # resize the short side to 32, centre crop 32×32, crop_pct 1
    region = input_region(enc, image)
    assert region.size == (100, 100)  # the central 100×100 of the 128×100 image
    assert np.array_equal(np.asarray(region), np.asarray(image)[:, 14:114])
    attn = np.zeros((4, 4), np.float32)
    attn[0, 0] = 1.0
    out = np.asarray(overlay(region, attn, alpha=1.0)).astype(int)
    assert out.shape == (100, 100, 3)
    assert out[0, 0].tolist() == [252, 255, 164] and out[-1, -1].tolist() == [0, 0, 4]  # the ramp's two ends
