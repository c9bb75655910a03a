"""Patch grids: cut every image of a batch into an n×n grid of square patches, with gaps, jitter and overlap.

The shared machinery of the patch-context pretext tasks — relative patch position (Doersch et al. 2015), jigsaw
puzzles (Noroozi & Favaro 2016) and CPC over a patch grid (van den Oord et al. 2018; Hénaff et al. 2019) — and of
any method that runs one shared-weight tower over the patches of an image.

Geometry (:class:`GridGeometry`, in pixels of the view it cuts): cell ``(r, c)`` of the grid starts at
``origin + (r·stride, c·stride)``; its patch, ``patch`` pixels square, sits at the centre of the cell, moved by up to
``jitter`` pixels each way along each axis.

* A **gapped** grid (:func:`gapped_grid`; relative position, jigsaw) has ``stride`` = the cell side > ``patch``: the
  gap between neighbouring patches is ``stride − patch`` on average, and jitter moves each patch inside its own cell,
  never into its neighbour's.  Gaps and jitter keep a network from solving the task by continuing edges and textures
  across patch borders (Doersch et al. §3; Noroozi & Favaro §3.1).
* An **overlapping** grid (:func:`overlapping_grid`; CPC) has ``stride < patch``: 7×7 patches of a quarter of the
  side with half overlap is CPC's layout (64-px patches, stride 32, on 256-px images; Hénaff et al. §4).

Geometry is given in fractions of the view (patch side / cell side, jitter / patch side) and resolved to pixels for
the view's size, so one recipe's layout scales from a 16-px test image to a 96-px Imagenette view.

Randomness: :func:`sample_positions` draws a per-sample grid origin (the grid spans at most the view; the slack left
over moves it) and per-patch jitter through :class:`RowDraws`: draws made for the step's whole global batch from its
shared seed, of which each process and micro-batch takes its own rows, so positions do not depend on how a step is
split (2 processes = 1) and a resumed step redraws them exactly.  The guards take their random parameters as
tensors, drawn the same way by the method.

The anti-shortcut guards of Doersch et al. §3 act on patches in ``[0, 1]``: :func:`drop_colour_channels` and
:func:`project_out_green_magenta` (chromatic aberration) and :func:`pixelate` (down- then up-sampling).  Jigsaw's
per-tile normalisation is :func:`normalize_each_patch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sslhub.config import check
from sslhub.errors import InputError

# The green–magenta axis of RGB (pure green minus the mean of red and blue), unit length: the colour direction
# along which lens chromatic aberration separates (Doersch et al. 2015 §3, "projection").
GREEN_MAGENTA = (-1 / math.sqrt(6), 2 / math.sqrt(6), -1 / math.sqrt(6))


@dataclass(frozen=True)
class GridGeometry:
    """An ``n × n`` grid of ``patch``-pixel patches whose cells start ``stride`` pixels apart, inside a
    ``size``-pixel view; each patch moves up to ``jitter`` pixels each way inside its cell."""

    n: int
    patch: int
    stride: int
    jitter: int
    size: int

    def __post_init__(self):
        if min(self.n, self.patch, self.stride, self.size) < 1 or self.jitter < 0:
            raise InputError(f"patch grid: n, patch, stride and size must be >= 1 and jitter >= 0, got {self}")
        if self.span > self.size:
            raise InputError(f"patch grid: {self.n}×{self.n} cells of {self.stride} px with {self.patch}-px patches "
                             f"span {self.span} px, more than the {self.size}-px view")
        if self.stride >= self.patch and self.centre + self.jitter > self.stride - self.patch:
            raise InputError(f"patch grid: jitter {self.jitter} px moves a {self.patch}-px patch out of its "
                             f"{self.stride}-px cell")

    @property
    def span(self) -> int:
        """Pixels the grid covers along each axis."""
        return (self.n - 1) * self.stride + max(self.stride, self.patch)

    @property
    def slack(self) -> int:
        """Room left in the view: the grid's origin is drawn from ``0 … slack``."""
        return self.size - self.span

    @property
    def centre(self) -> int:
        """Offset of an unjittered patch inside its cell (0 when patches overlap)."""
        return max(self.stride - self.patch, 0) // 2

    @property
    def count(self) -> int:
        return self.n * self.n


def gapped_grid(size: int, n: int, patch_frac: float, jitter_frac: float) -> GridGeometry:
    """Cells of ``size // n`` pixels, each holding a patch of ``patch_frac`` of the cell side (at least 1 px), moved by
    up to ``jitter_frac`` × the patch side each way, clipped so the patch stays in its cell (``jitter_frac=1``: the
    patch may sit anywhere in its cell, Noroozi & Favaro's random crop inside each tile's cell)."""
    if not 0 < patch_frac <= 1:
        raise InputError(f"patch grid: the patch side is a fraction of the cell side in (0, 1], got {patch_frac}")
    cell = size // n
    if cell < 1:
        raise InputError(f"patch grid: a {size}-px view has no room for a {n}×{n} grid")
    patch = max(1, round(patch_frac * cell))
    room = cell - patch
    jitter = min(int(round(jitter_frac * patch)), room // 2)  # centre ± jitter stays inside the cell
    return GridGeometry(n=n, patch=patch, stride=cell, jitter=max(jitter, 0), size=size)


def overlapping_grid(size: int, n: int, overlap: float) -> GridGeometry:
    """``n × n`` patches, neighbours sharing ``overlap`` of a patch side, as large as fit in ``size`` pixels
    (CPC: n=7, overlap 0.5 → patches of a quarter of the side, stride half a patch)."""
    if not 0 <= overlap < 1:
        raise InputError(f"patch grid: overlap is a fraction of the patch side in [0, 1), got {overlap}")
    patch = int(size / ((n - 1) * (1 - overlap) + 1))
    stride = max(1, round(patch * (1 - overlap)))
    while patch > 1 and (n - 1) * stride + patch > size:
        patch -= 1
        stride = max(1, round(patch * (1 - overlap)))
    return GridGeometry(n=n, patch=max(patch, 1), stride=stride, jitter=0, size=size)


class RowDraws:
    """Random numbers for rows ``start … start + n`` of a batch, the same whatever ``start + n`` is.

    Call ``k`` draws ``(start + n, *tail)`` numbers from a generator of its own, seeded by ``(seed, k)``, and keeps
    rows ``start …``: torch fills a CPU draw element by element in row-major order, so row ``i`` gets the same
    numbers however many rows follow it (Gaussian numbers are made from uniform ones by Box–Muller for the same
    reason: torch's own ``randn`` fills blocks of 16).  A method builds one from the step's shared seed and its
    batch's offset in the global batch (``Batch.sample_seed()``, ``Batch.sample_offset()``), so every sample's draws
    are those it gets in one process at the whole batch: positions and guards do not depend on how a step is split
    over processes or micro-batches, and a resumed step redraws them exactly."""

    def __init__(self, seed: int, start: int, n: int):
        self.seed, self.start, self.n, self.calls = int(seed), int(start), int(n), 0

    def _gen(self) -> torch.Generator:
        self.calls += 1
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls * 0x9E3779B1) % (2**63))

    def randint(self, low: int, high: int, *tail: int) -> Tensor:
        return torch.randint(low, high, (self.start + self.n, *tail), generator=self._gen())[self.start:]

    def rand(self, *tail: int) -> Tensor:
        return torch.rand((self.start + self.n, *tail), generator=self._gen())[self.start:]

    def randn(self, *tail: int) -> Tensor:
        u = torch.rand((self.start + self.n, 2, *tail), generator=self._gen(), dtype=torch.float64)[self.start:]
        return (torch.sqrt(-2 * torch.log1p(-u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])).float()


def sample_positions(geom: GridGeometry, draws: RowDraws | None = None, count: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-left corners ``(tops, lefts)``, each ``(n, n_grid²)`` int64, of every patch of ``draws.n`` samples,
    row-major over the grid.  Draws, in this order: the origin's row and column offsets ``(n, 2)`` in ``0 … slack``,
    then the jitter ``(n, n_grid², 2)`` in ``−jitter … jitter``.  ``draws=None``: ``count`` samples with the grid
    centred and no jitter (no randomness; evaluation)."""
    idx = torch.arange(geom.n)
    cell_r = idx.repeat_interleave(geom.n) * geom.stride + geom.centre  # (n·n,)
    cell_c = idx.repeat(geom.n) * geom.stride + geom.centre
    if draws is None:
        if count is None:
            raise ValueError("sample_positions needs draws, or count for a centred grid")
        o = torch.full((count, 2), geom.slack // 2, dtype=torch.long)
        jit = torch.zeros(count, geom.count, 2, dtype=torch.long)
    else:
        o = draws.randint(0, geom.slack + 1, 2)
        jit = draws.randint(-geom.jitter, geom.jitter + 1, geom.count, 2)
    tops = o[:, :1] + cell_r + jit[..., 0]
    lefts = o[:, 1:] + cell_c + jit[..., 1]
    return tops, lefts


def take_patches(x: Tensor, tops: Tensor, lefts: Tensor, patch: int) -> Tensor:
    """``x: (B, C, H, W)``, corners ``(B, P)`` → the patches ``(B, P, C, patch, patch)`` (one gather, any P)."""
    b, c, h, w = x.shape
    if tops.shape[0] != b or lefts.shape != tops.shape:
        raise ValueError(f"take_patches: corners {tuple(tops.shape)}/{tuple(lefts.shape)} for a batch of {b}")
    if tops.numel() and (int(tops.min()) < 0 or int(lefts.min()) < 0 or int(tops.max()) + patch > h
                         or int(lefts.max()) + patch > w):
        raise ValueError(f"take_patches: a {patch}-px patch at rows {int(tops.min())}…{int(tops.max())}, columns "
                         f"{int(lefts.min())}…{int(lefts.max())} leaves the {h}×{w} image")
    ar = torch.arange(patch, device=x.device)
    rows = (tops.to(x.device)[..., None] + ar)[:, :, :, None]  # (B, P, p, 1)
    cols = (lefts.to(x.device)[..., None] + ar)[:, :, None, :]  # (B, P, 1, p)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    return x.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 1, 4, 2, 3).contiguous()  # (B, P, C, p, p)


# ----------------------------------------------------------------------------- guards and per-patch normalisation
def drop_colour_channels(p: Tensor, keep: Tensor, eps: Tensor, fill: Tensor, noise: float = 0.01) -> Tensor:
    """Doersch et al. §3 "color dropping": of each patch ``(N, 3, h, w)`` keep channel ``keep (N,)``; the other two
    become ``fill`` (the channel means: 0 after normalisation) plus ``eps (N, 3, h, w)`` standard Gaussian noise
    scaled to ``noise`` × the kept channel's std in that patch (paper: ~1/100)."""
    n = p.shape[0]
    keep = keep.to(p.device)
    kept = p[torch.arange(n, device=p.device), keep]  # (N, h, w)
    std = kept.flatten(1).std(1, unbiased=False).view(n, 1, 1, 1)
    dropped = fill.to(p).view(1, -1, 1, 1) + noise * std * eps.to(p)
    mask = F.one_hot(keep, p.shape[1]).to(p.dtype).view(n, -1, 1, 1)
    return mask * p + (1 - mask) * dropped


def project_out_green_magenta(p: Tensor) -> Tensor:
    """Doersch et al. §3 "projection": remove each pixel's component along the green–magenta axis (gray is
    unchanged: the axis is orthogonal to (1, 1, 1)).  ``p: (…, 3, h, w)``."""
    a = torch.tensor(GREEN_MAGENTA, dtype=p.dtype, device=p.device).view(3, 1, 1)
    return p - (p * a).sum(-3, keepdim=True) * a


def pixelate_sides(u_hit: Tensor, u_side: Tensor, h: int, prob: float, min_frac: float) -> Tensor:
    """The side each patch is down-sampled to (``h``: untouched) from uniform draws ``u_hit, u_side`` in [0, 1):
    a share ``prob`` of the patches get a side uniform in ``⌈min_frac·h⌉ … h − 1``."""
    lo = min(max(1, math.ceil(min_frac * h)), h)
    side = lo + (u_side * (h - lo)).long().clamp_max(max(h - lo - 1, 0))
    return torch.where((u_hit < prob) & (lo < h), side, torch.full_like(side, h))


def pixelate(p: Tensor, sides: Tensor) -> Tensor:
    """Doersch et al. §3: down-sample each patch of ``p (N, C, h, h)`` to ``sides (N,)`` pixels (area averaging) and
    up-sample it back (bilinear), so fine texture cannot be a cue ("as little as 100 total pixels" of 96²)."""
    h = p.shape[-1]
    out = p.clone()
    for s in sides[sides < h].unique().tolist():
        sel = (sides == s).nonzero().squeeze(1).to(p.device)
        small = F.interpolate(p[sel], size=(s, s), mode="area")
        out[sel] = F.interpolate(small, size=(h, h), mode="bilinear", align_corners=False)
    return out


def normalize_each_patch(p: Tensor, eps: float = 1e-5) -> Tensor:
    """Noroozi & Favaro §3.1: each patch ``(…, C, h, w)`` to zero mean and unit std per channel, over its own pixels
    (no shortcut through low-level statistics shared by neighbouring tiles)."""
    mean = p.mean(dim=(-2, -1), keepdim=True)
    std = p.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (p - mean) / (std + eps)


@dataclass
class PatchGuards:
    """Doersch et al. 2015 §3's guards against trivial shortcuts, applied to each patch before the tower.

    ``colour``: chromatic aberration (lenses shift green and magenta apart towards the image's edges, which tells a
    patch where in the image it was): ``drop`` keeps one random channel and replaces the others by noise, ``project``
    removes the green–magenta component, ``none``.  ``pixelate_p``: the share of patches down-sampled to a side
    between ``pixelate_min`` × the patch side and one pixel less than it, then up-sampled (the paper: "as little as
    100 total pixels" of a 96² patch, a side fraction of ~0.1)."""

    colour: Literal["drop", "project", "none"] = "drop"
    colour_noise: float = 0.01  # std of the noise in dropped channels, × the kept channel's std (paper: ~1/100)
    pixelate_p: float = 0.5  # the paper says "some patches"; half is our choice
    pixelate_min: float = 0.1

    def __post_init__(self):
        check(self.colour in ("drop", "project", "none"), "colour", "must be drop, project or none")
        check(self.colour_noise >= 0, "colour_noise", "must be >= 0 (the paper: ~0.01)")
        check(0 <= self.pixelate_p <= 1, "pixelate_p", "a probability must be in [0, 1]")
        check(0 < self.pixelate_min <= 1, "pixelate_min", "a fraction of the patch side in (0, 1] (the paper: ~0.1)")

    @property
    def active(self) -> bool:
        return self.colour != "none" or self.pixelate_p > 0


def guard_patches(p: Tensor, guards: PatchGuards, draws: RowDraws, fill: Tensor) -> Tensor:
    """``guards`` on patches ``p (n, K, 3, h, h)`` in ``[0, 1]`` (K patches of each of ``draws.n`` samples); ``fill``:
    the per-channel mean a dropped channel takes.  Always draws, in this order, the kept channel ``(n, K)``, the
    noise ``(n, K, 3, h, h)`` and the pixelation draws ``(n, K)`` twice, so switching a guard off does not move
    the other random numbers."""
    n, k, c, h, w = p.shape
    keep, eps = draws.randint(0, c, k), draws.randn(k, c, h, w)
    u_hit, u_side = draws.rand(k), draws.rand(k)
    flat = p.flatten(0, 1)
    if guards.pixelate_p > 0:
        flat = pixelate(flat, pixelate_sides(u_hit.flatten(), u_side.flatten(), h, guards.pixelate_p,
                                             guards.pixelate_min))
    if guards.colour == "drop":
        flat = drop_colour_channels(flat, keep.flatten(), eps.flatten(0, 1), fill, guards.colour_noise)
    elif guards.colour == "project":
        flat = project_out_green_magenta(flat)
    return flat.view(n, k, c, h, w)
