"""Where a ViT looks: the last layer's class-token attention over the image patches, as in DINO.

    heads = attention_heads(encoder, "dog.jpg")    # (heads, gh, gw): one map per head
    attn = attention_map(encoder, pil_image)       # (gh, gw): the mean over heads (or head=i)
    picture = overlay(input_region(encoder, pil_image), attn)

Caron et al., *Emerging Properties in Self-Supervised Vision Transformers* (DINO, 2021,
https://arxiv.org/abs/2104.14294), Fig. 1 and ``visualize_attention.py``: in the last block, the
softmax attention of the class token (query) to every patch token (key), per head. The maps come at
the patch grid ``(gh, gw) = (S / patch, S / patch)`` of the model's input crop; ``input_region`` is the
part of the image that crop shows, so a map upsampled onto it lines up.

Supported: timm ``VisionTransformer`` models (timm folders, ``timm:`` names, sslhub exports of a timm
ViT, open_clip towers built on a timm ViT trunk) and open_clip's own ViT image towers. The input of the last block's attention is captured with a
forward pre-hook during an ordinary ``encoder.embed_images`` call, then the attention weights are
recomputed from it with the block's own projections. The hook records only the calling thread's
forward, so a served model can answer other requests meanwhile.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from sslhub.data.images import open_image, to_rgb
from sslhub.errors import InputError, SslhubError

ImageLike = Union[str, Path, Image.Image]

SUPPORTED = ("timm VisionTransformer models (timm folders, timm: names, sslhub exports of a timm ViT, open_clip "
             "towers on a timm ViT trunk) and open_clip's own ViT image towers")


class AttentionUnsupported(SslhubError, TypeError):
    """The encoder is not a ViT whose last-layer attention this module knows how to read."""


class _Vit:
    """What ``attention_heads`` needs from a ViT: its last attention module and its token layout."""

    def __init__(self, attn: nn.Module, num_prefix: int, patch: tuple[int, int], family: str):
        self.attn, self.num_prefix, self.patch, self.family = attn, num_prefix, patch, family

    @property
    def num_heads(self) -> int:
        return int(self.attn.num_heads)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention module's input ``x`` → softmax attention ``(B, heads, N, N)``."""
        if self.family == "timm":  # timm.layers.Attention.forward, unfused path, without dropout
            a = self.attn
            b, n, _ = x.shape
            qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
            q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
            return ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        # nn.MultiheadAttention computes its own weights, whatever its projection layout
        return self.attn(x, x, x, need_weights=True, average_attn_weights=False)[1]


def _find_vit(encoder) -> _Vit:
    """The ViT inside an sslhub ``Encoder``, or :class:`AttentionUnsupported` saying what it is instead."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    model = encoder.model
    visual = getattr(model, "visual", None)
    # timm; an sslhub Backbone; an open_clip tower; open_clip's TimmModel tower (a timm trunk)
    towers = [model, getattr(model, "model", None), visual, getattr(visual, "trunk", None)]
    for net in towers:
        if isinstance(net, VisionTransformer):
            attn = net.blocks[-1].attn
            if net.cls_token is None:
                raise AttentionUnsupported(f"{encoder.name or 'this encoder'} is a ViT without a class token: "
                                           "the DINO-style map is the class token's attention")
            if not isinstance(attn, Attention):
                raise AttentionUnsupported(f"the last block's attention is timm's {type(attn).__name__}, "
                                           f"not the standard Attention; supported: {SUPPORTED}")
            return _Vit(attn, int(net.num_prefix_tokens), tuple(net.patch_embed.patch_size), "timm")
    if visual is not None and hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):
        attn = visual.transformer.resblocks[-1].attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise AttentionUnsupported(f"the open_clip tower's last block uses {type(attn).__name__}, not "
                                       f"nn.MultiheadAttention; supported: {SUPPORTED}")
        return _Vit(attn, 1, tuple(visual.patch_size), "open_clip")
    inner = next((n for n in reversed(towers) if n is not None), model)  # the innermost network found
    raise AttentionUnsupported(f"attention maps need a vision transformer; {encoder.name or 'this encoder'} "
                               f"({encoder.kind}) is a {type(inner).__name__}. Supported: {SUPPORTED}")


def num_heads(encoder) -> int:
    """Heads of the last block's attention; raises :class:`AttentionUnsupported` for other encoders."""
    return _find_vit(encoder).num_heads


def _load(image: ImageLike) -> Image.Image:
    return to_rgb(image) if isinstance(image, Image.Image) else open_image(str(image), str(image))


@torch.no_grad()
def attention_heads(encoder, image: ImageLike) -> np.ndarray:
    """``(heads, gh, gw)`` float32: per head, the last block's class-token attention to each patch.

    Rows are the softmax weights of the class-token query restricted to patch keys (class and register
    tokens left out, as in DINO), so each head's map sums to at most 1.
    """
    vit = _find_vit(encoder)
    x = encoder.preprocess(_load(image))[None]  # (1, 3, S, S) the encoder's own preprocessing
    grid = (x.shape[-2] // vit.patch[0], x.shape[-1] // vit.patch[1])
    me, captured = threading.get_ident(), []

    def grab(_module: nn.Module, args: tuple) -> None:
        if threading.get_ident() == me:  # a concurrent request's forward is not ours
            captured.append(args[0].detach())

    handle = vit.attn.register_forward_pre_hook(grab)
    try:
        encoder.embed_images(x, batch_size=1)  # float input: taken as already preprocessed
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the last attention block, saw {len(captured)}")
    tokens = captured[0]
    if vit.family == "open_clip" and not vit.attn.batch_first:
        tokens = tokens.transpose(0, 1)  # (N, B, C) → (B, N, C)
    weights = vit.weights(tokens.to(encoder.device))  # (1, heads, N, N)
    cls_to_patches = weights[0, :, 0, vit.num_prefix:].float()  # (heads, N - prefix)
    if cls_to_patches.shape[1] != grid[0] * grid[1]:
        raise AttentionUnsupported(f"{cls_to_patches.shape[1]} patch tokens do not form the {grid[0]}×{grid[1]} "
                                   f"grid of a {x.shape[-2]}×{x.shape[-1]} input")
    return cls_to_patches.reshape(-1, *grid).cpu().numpy()


def attention_map(encoder, image: ImageLike, head: int | None = None) -> np.ndarray:
    """``(gh, gw)`` float32: the class-token attention of the last block, averaged over heads or of one head."""
    heads = attention_heads(encoder, image)
    if head is None:
        return heads.mean(axis=0)
    if not 0 <= head < heads.shape[0]:
        raise InputError(f"head must be in 0..{heads.shape[0] - 1}, got {head}")
    return heads[head]


def input_region(encoder, image: ImageLike) -> Image.Image:
    """The part of ``image`` the encoder's input crop shows (resize short side, centre crop at ``crop_pct``)."""
    img = _load(image)
    w, h = img.size
    size = encoder.image_size
    ch, cw = (size, size) if isinstance(size, int) else size
    scale = min(ch, cw) / (encoder.crop_pct * min(w, h))  # image pixels → model input pixels
    rw, rh = min(w, cw / scale), min(h, ch / scale)
    left, top = (w - rw) / 2, (h - rh) / 2
    return img.crop((round(left), round(top), round(left + rw), round(top + rh)))


# A perceptually ordered ramp (dark blue → magenta → orange → pale yellow), close to matplotlib's "inferno".
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def overlay(region: Image.Image, attn: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """``attn (gh, gw)`` upsampled onto ``region``, min–max scaled and coloured, blended at ``alpha``."""
    a = np.asarray(Image.fromarray(attn.astype(np.float32), mode="F").resize(region.size, Image.BILINEAR))
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)  # (H, W) in [0, 1]
    pos = a * (len(_RAMP) - 1)
    lo = np.minimum(pos.astype(int), len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    colour = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac  # (H, W, 3)
    base = np.asarray(region.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(base * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8))
