"""Image regions to hide and fill in: the masks of context-encoder inpainting and its reconstruction loss.

- [0] Pathak, Krähenbühl, Donahue, Darrell, Efros. Context Encoders: Feature Learning by Inpainting. CVPR 2016,
  https://arxiv.org/abs/1604.07379 (§3.3 the three region shapes; §3.2 the joint loss; the reference code's
  4-px overlap border weighted 10×).

Masks are bool tensors ``(n, H, W)``, **True where the pixels are hidden** (as sslhub's patch masks).

* :func:`central_square` — a centred square of ``frac`` of the side ([0]: 64 × 64 of 128 × 128, frac 1/2).
* :func:`random_blocks` — ``count`` squares of ``block_frac`` of the side at random places, overlapping allowed
  ([0] §3.3: "a number of smaller possibly overlapping masks, covering up to 1/4 of the image").
* :func:`random_regions` — arbitrary smooth shapes covering ``coverage`` of the image.  [0] cut them from PASCAL VOC
  segmentation masks, which cannot be had here; the nearest real thing is a thresholded low-frequency noise field
  (coarse Gaussian noise up-sampled bicubically) whose top ``coverage`` share of pixels is hidden: blob-shaped
  regions of exactly the share asked, different for every image.

Random masks draw through :class:`sslhub.data.grid.RowDraws`, so an image's mask depends on its place in the step's
global batch, not on how the step is split over processes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslhub.data.grid import RowDraws


def central_square(n: int, size: int, frac: float = 0.5) -> Tensor:
    """``(n, size, size)`` masks hiding the centred square of side ``round(frac · size)``."""
    side = max(1, round(frac * size))
    top = (size - side) // 2
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, top : top + side, top : top + side] = True
    return mask


def random_blocks(size: int, draws: RowDraws, count: int = 4, block_frac: float = 0.25) -> Tensor:
    """``(draws.n, size, size)`` masks, each the union of ``count`` squares of side ``round(block_frac · size)`` with
    top-left corners drawn uniformly (one draw ``(n, count, 2)``)."""
    side = max(1, round(block_frac * size))
    corners = draws.randint(0, size - side + 1, count, 2)  # (n, count, 2)
    ar = torch.arange(size)
    rows = (ar.view(1, 1, size) >= corners[..., :1]) & (ar.view(1, 1, size) < corners[..., :1] + side)  # (n, c, H)
    cols = (ar.view(1, 1, size) >= corners[..., 1:]) & (ar.view(1, 1, size) < corners[..., 1:] + side)  # (n, c, W)
    return (rows[..., :, None] & cols[..., None, :]).any(1)


def random_regions(size: int, draws: RowDraws, coverage: float = 0.25, coarse: int = 4) -> Tensor:
    """``(draws.n, size, size)`` masks hiding exactly ``round(coverage · size²)`` pixels each: the top of a smooth noise
    field (``coarse × coarse`` Gaussian noise up-sampled bicubically; one draw ``(n, coarse, coarse)``)."""
    noise = draws.randn(1, coarse, coarse)  # (n, 1, c, c)
    field = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).flatten(1)  # (n, H·W)
    k = min(max(1, round(coverage * size * size)), size * size)
    top = field.topk(k, dim=1).indices
    mask = torch.zeros_like(field, dtype=torch.bool).scatter_(1, top, True)
    return mask.view(-1, size, size)


def border(mask: Tensor, width: int) -> Tensor:
    """The ring of hidden pixels within ``width`` pixels (Chebyshev distance) of a visible one: the part of the hole
    whose prediction overlaps the context ([0]'s reference code predicts the hole and a ``width``-px border)."""
    if width <= 0:
        return torch.zeros_like(mask)
    visible = (~mask).float().unsqueeze(1)
    near = F.max_pool2d(visible, 2 * width + 1, stride=1, padding=width).squeeze(1) > 0
    return mask & near


def masked_l2(pred: Tensor, target: Tensor, mask: Tensor, border_width: int = 4, border_weight: float = 10.0) -> Tensor:
    """[0]'s reconstruction loss: the squared error over the hidden pixels (``mask (n, H, W)``, every channel), each
    weighted 1, and ``border_weight`` within ``border_width`` px of the hole's edge; normalised by the weights' sum,
    so it is a weighted mean per hidden pixel and channel."""
    w = mask.float() + (border_weight - 1) * border(mask, border_width).float()  # (n, H, W)
    err = (pred.float() - target.float()).pow(2).sum(1)  # (n, H, W): summed over channels
    return (w * err).sum() / (w.sum() * pred.shape[1]).clamp_min(1e-12)
