"""What the patch-context pretext methods share (relative position, jigsaw): a shared-weight tower run on every patch.

The grid, its random positions and the anti-shortcut guards live in ``sslhub.data.grid`` (the data layer); this
module holds the method side: views augmented to ``[0, 1]`` (the guards act on raw colours, normalisation comes
after), a 3×3 gapped grid from the config's ``patch_frac``/``jitter_frac``, the tower (backbone + an optional
per-patch layer shared by every patch, the papers' ``fc6``) and a picture helper.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from sslhub.config import check
from sslhub.data.augment import BatchAugment, ViewConfig, eval_transform, normalize
from sslhub.data.grid import GridGeometry, PatchGuards, RowDraws, gapped_grid, guard_patches, normalize_each_patch
from sslhub.methods.base import Method, MethodConfig


@dataclass
class PatchContextConfig(MethodConfig):
    """The grid, guards and classifier width both methods have; each method sets its paper's defaults."""

    patch_frac: float = 0.67  # patch side / cell side
    jitter_frac: float = 0.075  # up to this × the patch side each way, clipped to the cell (1: anywhere in it)
    guards: PatchGuards = field(default_factory=PatchGuards)
    hidden_dim: int = 512  # fc7 on the concatenated patch features
    views: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self):
        check(0 < self.patch_frac <= 1, "patch_frac", "the patch side as a fraction of a grid cell's, in (0, 1] "
              "(relative position: 0.67, a half-patch gap; jigsaw: 64/75 = 0.85)")
        check(0 <= self.jitter_frac <= 1, "jitter_frac", "the jitter as a fraction of the patch side, in [0, 1] "
              "(relative position: 0.075; jigsaw: 1, anywhere in the cell)")
        check(self.hidden_dim >= 1, "hidden_dim", "must be a positive integer (the papers: 4096)")
        check(self.views.size >= 3, "views.size", "a 3×3 grid needs a view of at least 3 px")


def mlp_block(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True))


class PatchTowerMethod(Method):
    """What the patch-context methods share: an augmentation to ``[0, 1]`` (guards act before normalising), the grid
    of the view, and a tower = backbone + an optional shared per-patch layer."""

    def __init__(self, backbone, cfg, patch_dim: int):
        super().__init__(backbone, cfg)
        self.patch_head = mlp_block(backbone.dim, patch_dim) if patch_dim > 0 else nn.Identity()
        self.patch_dim = patch_dim or backbone.dim
        self.augment = BatchAugment(dataclasses.replace(cfg.views, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
        enc = backbone.cfg
        self.register_buffer("mean", torch.tensor(enc.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(enc.std, dtype=torch.float32), persistent=False)

    def guard(self, patches: torch.Tensor, draws: RowDraws) -> torch.Tensor:
        """The recipe's guards (``cfg.guards``) on training patches ``(n, K, 3, p, p)`` in ``[0, 1]``."""
        return guard_patches(patches, self.cfg.guards, draws, self.mean) if self.cfg.guards.active else patches

    def geometry(self, size: int) -> GridGeometry:
        return gapped_grid(size, 3, self.cfg.patch_frac, self.cfg.jitter_frac)

    def tower(self, patches: torch.Tensor, own_statistics: bool = False) -> torch.Tensor:
        """``(n, K, 3, p, p)`` patches in ``[0, 1]`` → features ``(n, K, patch_dim)``: one shared tower per patch.
        Patches are normalised with the encoder's mean and std, or each on its own (``own_statistics``: jigsaw)."""
        n, k = patches.shape[:2]
        flat = patches.flatten(0, 1)
        x = normalize_each_patch(flat) if own_statistics else normalize(flat, self.mean, self.std)
        return self.patch_head(self.backbone(x)).view(n, k, self.patch_dim)

    def eval_views(self, images: torch.Tensor) -> torch.Tensor:
        """Held-out uint8 images → ``[0, 1]`` views at the training view's size."""
        return eval_transform(images, self.cfg.views.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def outline(img: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, side: int, rgb: tuple[int, int, int]) -> torch.Tensor:
    """A copy of uint8 images ``(n, 3, H, W)`` with a one-pixel ``rgb`` square of ``side`` px at each (top, left)."""
    out = img.clone()
    colour = torch.tensor(rgb, dtype=torch.uint8).view(3, 1)
    for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist())):
        b, r = t + side - 1, l + side - 1
        out[i, :, t, l : r + 1] = colour
        out[i, :, b, l : r + 1] = colour
        out[i, :, t : b + 1, l] = colour
        out[i, :, t : b + 1, r] = colour
    return out
