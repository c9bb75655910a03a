"""Patch grids and masks for masked image modeling, and a timm ViT run on some of its patches.

Shared by every method that cuts an image into a grid of patches and hides some of them (MAE, SimMIM; the
patch-context pretext tasks reuse the grid).  Conventions, those of MAE's official code:

* ``patchify(x, p)``: ``(B, C, H, W)`` → ``(B, L, p·p·C)`` with ``L = (H/p)·(W/p)`` patches in row-major order and
  each patch flattened as ``(row, col, channel)``; ``unpatchify`` is its inverse.
* A mask is a bool tensor ``(B, L)``, **True where a patch is hidden**.  Every sample of a batch hides the same
  number of patches, ``n_hidden(L, ratio) = round(ratio · L)``, so per-sample means and the batch mean agree and
  a loss averaged per process is the loss of the whole batch.
* Masks are drawn for the step's **global** batch from a seed shared by the processes, and each batch takes its
  own rows (``MaskedModeling.mask_for``, ``Batch.seed``/``offset``): an image's mask does not depend on how many
  processes or micro-batches the step is split into.

``encode_visible`` runs a timm ``VisionTransformer`` on the visible patches only (MAE's encoder: the sequence is
the prefix tokens + the visible patches, so compute falls with the masking ratio); ``encode_with_mask_token``
runs it on every patch with the hidden ones replaced by a learned token (SimMIM's encoder).  Both keep timm's
parameters and names untouched, so the trained encoder is exported as the plain timm model it is.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sslhub.errors import InputError


# ------------------------------------------------------------------ the ViT and its grid
def vit_of(model: nn.Module, method: str) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (a :class:`~sslhub.models.backbone.Backbone` or the ViT), or
    a clear error naming the recipe field to change."""
    from timm.models.vision_transformer import VisionTransformer

    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise InputError(f"{method} needs a timm Vision Transformer (encoder.arch: vit_*, e.g. vit_tiny_patch16_224 "
                         f"with encoder.model_args.patch_size), not {type(vit).__name__}")
    if getattr(vit, "dynamic_img_size", False):
        raise InputError(f"{method}: encoder.model_args.dynamic_img_size is not supported (the patch grid is fixed)")
    return vit


def patch_size(vit: nn.Module) -> int:
    p = vit.patch_embed.patch_size
    if p[0] != p[1]:
        raise InputError(f"square patches are needed, the encoder's are {tuple(p)}")
    return int(p[0])


def grid_size(vit: nn.Module) -> tuple[int, int]:
    return tuple(int(g) for g in vit.patch_embed.grid_size)  # type: ignore[return-value]


# ------------------------------------------------------------------ patches ↔ images
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, L, p·p·C)``: row-major patches, each flattened as (row, col, channel)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise InputError(f"images of {h}x{w} px do not split into {p}-px patches")
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """``(B, L, p·p·C)`` → ``(B, C, H, W)``, the inverse of :func:`patchify`."""
    gh, gw = grid
    b = x.shape[0]
    x = x.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * p, gw * p)


def mask_to_pixels(mask: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """A patch mask ``(B, L)`` as a pixel mask ``(B, 1, H, W)`` (1.0 where hidden)."""
    gh, gw = grid
    m = mask.reshape(-1, 1, gh, gw).float()
    return m.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)


# ------------------------------------------------------------------ fixed 2-D sin-cos positions
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], n_prefix: int = 1) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding ``(n_prefix + gh·gw, dim)``; prefix tokens get zeros.

    Half of the channels encode the row, half the column; each half is ``[sin(pos·ω), cos(pos·ω)]`` with
    ``ω_k = 1 / 10000^(k / (dim/4))``, ``k = 0 … dim/4 − 1`` (MAE's ``get_2d_sincos_pos_embed``)."""
    if dim % 4:
        raise InputError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    # MAE's meshgrid(w, h) puts the column coordinate first: emb = [cols' encoding, rows' encoding]
    emb = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    emb = np.concatenate([np.zeros((n_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def fix_pos_embed(vit: nn.Module) -> None:
    """Make a timm ViT's position embedding MAE's fixed sin-cos one (frozen; still in its state dict, so the
    export is the plain timm model with these values)."""
    if vit.pos_embed is None:
        raise InputError("the encoder has no absolute position embedding to fix (encoder.model_args.pos_embed)")
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed_2d(vit.pos_embed.shape[-1], grid_size(vit), n_prefix)[None])
    vit.pos_embed.requires_grad_(False)


# ------------------------------------------------------------------ masks
def n_hidden(n_patches: int, ratio: float) -> int:
    """Patches hidden per sample: ``round(ratio · L)`` (methods check it is in [1, L − 1])."""
    return int(round(ratio * n_patches))


def random_mask(batch: int, n_patches: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """MAE's per-sample random masking by sorting noise: the ``n_hidden`` patches with the largest noise are
    hidden.  ``(B, L)`` bool, True = hidden."""
    noise = torch.rand(batch, n_patches, generator=g)
    order = noise.argsort(dim=1)  # ascending: the first L − n_hidden are kept (MAE keeps the smallest noise)
    mask = torch.zeros(batch, n_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, n_patches - n_hidden(n_patches, ratio):], True)
    return mask


def block_mask(batch: int, grid: tuple[int, int], ratio: float, g: torch.Generator,
               min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """BEiT's block-wise masking (Bao et al. 2021, Algorithm 1), as in MAE's Table 1(f): rectangles of at least
    ``min_block`` patches with random aspect ratios are hidden until ``n_hidden`` patches are; the last block
    is trimmed (or random patches added when no block fits) so the count is exact."""
    gh, gw = grid
    L = gh * gw
    want = n_hidden(L, ratio)
    out = torch.zeros(batch, L, dtype=torch.bool)
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    for b in range(batch):
        m = torch.zeros(gh, gw, dtype=torch.bool)
        tries = 0
        while int(m.sum()) < want and tries < 100:
            tries += 1
            left = want - int(m.sum())
            u = torch.rand(4, generator=g).tolist()
            area = min_block + u[0] * (max(min_block, left) - min_block)
            r = math.exp(lo + u[1] * (hi - lo))
            h = max(1, min(gh, int(round(math.sqrt(area * r)))))
            w = max(1, min(gw, int(round(math.sqrt(area / r)))))
            top, left_col = int(u[2] * (gh - h + 1)), int(u[3] * (gw - w + 1))
            block = torch.zeros(gh, gw, dtype=torch.bool)
            block[top : top + h, left_col : left_col + w] = True
            new = (block & ~m).flatten().nonzero().flatten()
            if len(new) > left:  # trim the block to the exact count (row-major order inside it)
                new = new[:left]
            m.view(-1)[new] = True
        flat = m.flatten()
        short = want - int(flat.sum())
        if short > 0:  # no block fitted: random visible patches make up the count
            free = (~flat).nonzero().flatten()
            flat[free[torch.randperm(len(free), generator=g)[:short]]] = True
        out[b] = flat
    return out


def coarse_mask(batch: int, grid: tuple[int, int], scale: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """SimMIM's masking: random masking on a grid ``scale`` times coarser than the patch grid (the paper's 32-px
    mask patches over 16-px patches: ``scale`` 2), each mask cell hiding its ``scale²`` patches."""
    gh, gw = grid
    if gh % scale or gw % scale:
        raise InputError(f"the {gh}x{gw} patch grid does not split into mask cells of {scale}x{scale} patches "
                         "(method_args.mask_patch_size must be a multiple of the patch size dividing the image)")
    cells = random_mask(batch, (gh // scale) * (gw // scale), ratio, g).reshape(batch, gh // scale, gw // scale)
    return cells.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).reshape(batch, gh * gw)


# ------------------------------------------------------------------ the ViT on visible / mask-token patches
def _prefix(vit: nn.Module, batch: int) -> torch.Tensor | None:
    """The class (and register) tokens with their position embeddings, ``(B, n_prefix, D)``, or None."""
    parts = []
    if vit.cls_token is not None:
        parts.append(vit.cls_token.expand(batch, -1, -1))
    if getattr(vit, "reg_token", None) is not None:
        parts.append(vit.reg_token.expand(batch, -1, -1))
    if not parts:
        return None
    prefix = torch.cat(parts, dim=1)
    if vit.pos_embed is not None and not vit.no_embed_class:
        prefix = prefix + vit.pos_embed[:, : prefix.shape[1]]
    return prefix


def _patch_pos(vit: nn.Module) -> torch.Tensor | None:
    if vit.pos_embed is None:
        return None
    return vit.pos_embed if vit.no_embed_class else vit.pos_embed[:, vit.num_prefix_tokens :]


def _blocks(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = vit.norm_pre(vit.pos_drop(x))
    return vit.norm(vit.blocks(x))


def keep_indices(mask: torch.Tensor) -> torch.Tensor:
    """``(B, L − n)`` indices of the visible patches of each sample, in grid order."""
    counts = (~mask).sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample of a batch must hide the same number of patches")
    return (mask.int().argsort(dim=1, stable=True))[:, : int(counts[0])]


def encode_visible(vit: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's encoder: ``(B, n_prefix + K, D)`` tokens of the prefix and the ``K`` visible patches (grid order).

    Patches are embedded, given their position embedding, the hidden ones dropped; then the prefix tokens are
    prepended and the ViT's blocks and final norm run on that short sequence."""
    tokens = vit.patch_embed(x)  # (B, L, D)
    pos = _patch_pos(vit)
    if pos is not None:
        tokens = tokens + pos
    idx = keep_indices(mask)
    tokens = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
    prefix = _prefix(vit, x.shape[0])
    if prefix is not None:
        tokens = torch.cat([prefix, tokens], dim=1)
    return _blocks(vit, tokens)


def encode_with_mask_token(vit: nn.Module, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """SimMIM's encoder: every patch, the hidden ones' embeddings replaced by ``mask_token`` ``(1, 1, D)`` before
    the position embedding is added; ``(B, n_prefix + L, D)``."""
    tokens = vit.patch_embed(x)
    w = mask[..., None].to(tokens.dtype)
    tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
    return vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(tokens))))


def n_prefix_tokens(vit: nn.Module) -> int:
    return int(vit.num_prefix_tokens)


def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers (and the patch projection, seen as one), zero biases,
    unit LayerNorms; class and mask tokens N(0, 0.02) are set by their owners."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = getattr(getattr(module, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
