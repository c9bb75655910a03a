"""Relative patch position: which of its 8 neighbours is this patch of the centre patch?

- [0] Doersch, Gupta, Efros. Unsupervised Visual Representation Learning by Context Prediction. ICCV 2015,
  https://arxiv.org/abs/1505.05192

Each image is cut into a 3×3 grid of patches with gaps between them and random jitter of each patch inside its
cell (``sslhub.data.grid``); the centre patch and one neighbour drawn uniformly are fed, each on its own, through
one shared-weight tower (the backbone, then a per-patch ``fc6``), their features are concatenated and an 8-way
classifier (``fc7``, ``fc8``) says where the neighbour sits.  Labels follow the paper's Fig. 2, row-major over the
grid with the centre left out::

    0 1 2
    3 · 4
    5 6 7

The guards against trivial shortcuts (§3) act on each patch before the tower: chromatic aberration is removed by
colour dropping (or projection) and a share of the patches are down- then up-sampled (:class:`PatchGuards`).  Gaps
(§3: half a patch) and jitter (up to 7 of 96 px) keep low-level continuation across borders from solving the task.

Geometry on small images (the CIFAR-10 recipe): the paper's 96-px patches with 48-px gaps fill 3×3 cells of
144 px; on a 32-px view the cells are 10 px, the patches 7 px (2/3 of a cell, the paper's ratio), the gap 3 px and
the jitter ±1 px.  The exported encoder is the tower alone, applied to whole images at ``encoder.image_size``
(32 px: 4.5× the patch side it was trained on), as every export is for k-NN, probes and retrieval.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.data.grid import PatchGuards, RowDraws, guard_patches, sample_positions, take_patches
from sslhub.methods.base import Batch
from sslhub.methods.common import projection_mlp
from sslhub.methods.patch_context import PatchContextConfig, PatchTowerMethod, outline
from sslhub.methods.registry import register_method
from sslhub.publish.pictures import image_grid

CENTRE = 4  # the centre cell of the row-major 3×3 grid
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)  # label k → the grid cell of the neighbour (paper Fig. 2)
N_CLASSES = len(NEIGHBOURS)


def pair_corners(tops: torch.Tensor, lefts: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners ``(n, 2)`` of the (centre, neighbour ``labels``) pair from a 3×3 grid's corners ``(n, 9)``."""
    cell = torch.tensor(NEIGHBOURS)[labels.cpu()].to(tops.device)[:, None]
    pick = torch.cat([torch.full_like(cell, CENTRE), cell], 1)  # (n, 2)
    return tops.gather(1, pick), lefts.gather(1, pick)


@dataclass
class RelativePositionConfig(PatchContextConfig):
    patch_frac: float = 0.67  # paper: 96-px patches in 144-px cells (48-px gaps) → 96/144
    jitter_frac: float = 0.075  # paper: up to 7 px of 96 each way
    guards: PatchGuards = field(default_factory=PatchGuards)  # paper: colour dropping + down-then-up sampling
    hidden_dim: int = 512  # fc7 on the concatenated pair (paper: 4096)
    # Paper: patches from whole images resized to 150k–450k pixels, no other augmentation; here a mild random
    # crop and flip of the image before the grid is cut (a flip of the whole image keeps the geometry's labels).
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=32, scale=(0.6, 1.0), hflip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0))
    patch_dim: int = 512  # fc6, per patch and shared (paper: 4096 on AlexNet; 0 → the backbone's features)
    # Paper: one neighbour drawn per image.  True: all 8 pairs of each image, the centre's tower run once for
    # them (9 patches for 8 labels instead of 2 for 1: 3.6x the labels per tower FLOP, and 8x less label noise)
    all_neighbours: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(self.patch_dim >= 0, "patch_dim", "must be >= 0 (0: the backbone's features go straight to fc7)")


@register_method("relative_position")
class RelativePosition(PatchTowerMethod):
    Config = RelativePositionConfig
    paper = "Doersch et al. 2015, https://arxiv.org/abs/1505.05192"

    def __init__(self, backbone, cfg: RelativePositionConfig):
        super().__init__(backbone, cfg, cfg.patch_dim)
        self.classifier = projection_mlp(2 * self.patch_dim, cfg.hidden_dim, N_CLASSES)  # fc7 (BN, ReLU), fc8

    def pairs(self, x: torch.Tensor, draws: RowDraws | None, labels: torch.Tensor) -> torch.Tensor:
        """Views ``x (n, 3, S, S)`` in ``[0, 1]`` → the (centre, neighbour ``labels``) patches ``(n, 2, 3, p, p)``
        at positions from ``draws`` (``None``: a centred grid without jitter)."""
        geom = self.geometry(x.shape[-1])
        tops, lefts = sample_positions(geom, draws, count=x.shape[0])
        t, l = pair_corners(tops, lefts, labels)
        return take_patches(x, t, l, geom.patch)

    def grids(self, x: torch.Tensor, draws: RowDraws | None) -> torch.Tensor:
        """Views → all 9 patches of each grid ``(n, 9, 3, p, p)`` (``draws=None``: centred, no jitter)."""
        geom = self.geometry(x.shape[-1])
        tops, lefts = sample_positions(geom, draws, count=x.shape[0])
        return take_patches(x, tops, lefts, geom.patch)

    def classify(self, centre: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
        """Tower features ``(m, d)`` of centres and neighbours → 8-way logits ``(m, 8)`` (fc7, fc8 on the pair)."""
        return self.classifier(torch.cat([centre, neighbour], 1)).float()

    def all_pairs(self, feats: torch.Tensor) -> torch.Tensor:
        """Features of whole grids ``(n, 9, d)`` → logits ``(8n, 8)`` of every (centre, neighbour k) pair, row
        ``8i + k``: the centre's tower runs once for its 8 pairs."""
        n, _, d = feats.shape
        centre = feats[:, CENTRE : CENTRE + 1].expand(n, N_CLASSES, d)
        return self.classify(centre.reshape(-1, d), feats[:, list(NEIGHBOURS)].reshape(-1, d))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        n = batch.images.shape[0]
        draws = RowDraws(batch.sample_seed(), batch.sample_offset(), n)  # before rng
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S) in [0, 1]
        if self.cfg.all_neighbours:  # every image: its 8 pairs
            logits = self.all_pairs(self.tower(self.guard(self.grids(x, draws), draws)))  # (8B, 8)
            labels = torch.arange(N_CLASSES, device=x.device).repeat(n)
        else:  # the paper: one neighbour drawn per image
            labels = draws.randint(0, N_CLASSES).to(x.device)  # (B,)
            feats = self.tower(self.guard(self.pairs(x, draws, labels), draws))  # (B, 2, d)
            logits = self.classify(feats[:, 0], feats[:, 1])  # (B, 8)
        return {"loss": F.cross_entropy(logits, labels),
                "relpos_acc": (logits.argmax(1) == labels).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
        """Pretext accuracy on held-out images, all 8 neighbours of each centred, unjittered grid:
        ``relpos_acc`` on clean patches, ``relpos_acc_guarded`` with the paper's guards (``PatchGuards()``, drawn
        from a fixed seed: the same test for every model, whatever guards it trained with)."""
        correct = {"relpos_acc": 0, "relpos_acc_guarded": 0}
        total = 0
        for i in range(0, images.shape[0], batch_size):
            grids = self.grids(self.eval_views(images[i : i + batch_size]), None)  # (n, 9, 3, p, p)
            k = torch.arange(N_CLASSES, device=grids.device).repeat(grids.shape[0])
            guarded = guard_patches(grids, PatchGuards(), RowDraws(i, 0, grids.shape[0]), self.mean)
            for key, p in (("relpos_acc", grids), ("relpos_acc_guarded", guarded)):
                correct[key] += int((self.all_pairs(self.tower(p)).argmax(1) == k).sum())
            total += k.numel()
        return {key: c / max(total, 1) for key, c in correct.items()}

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, what: str = "held-out images", seed: int = 0) -> dict[str, tuple[bytes, str]]:
        """Sampled pairs as training draws them: the view with the centre (red) and neighbour (green) outlined, the
        two patches as the tower sees them (guards applied), and where the model puts the neighbour (blue)."""
        x = self.eval_views(images[:8])
        n = x.shape[0]
        draws = RowDraws(seed, 0, n)
        geom = self.geometry(x.shape[-1])
        tops, lefts = sample_positions(geom, draws)
        labels = draws.randint(0, N_CLASSES).to(x.device)
        t, l = pair_corners(tops, lefts, labels)
        p = take_patches(x, t, l, geom.patch)
        feats = self.tower(self.guard(p, draws))
        pred = self.classify(feats[:, 0], feats[:, 1]).argmax(1)
        tp, lp = pair_corners(tops, lefts, pred)
        img = self.to_uint8(x)
        boxed = outline(outline(img, t[:, 0], l[:, 0], geom.patch, (255, 0, 0)), t[:, 1], l[:, 1], geom.patch, (0, 255, 0))
        guessed = outline(img, tp[:, 1], lp[:, 1], geom.patch, (0, 0, 255))
        png = image_grid([boxed, self.to_uint8(p[:, 0]), self.to_uint8(p[:, 1]), guessed],
                         ["pair", "centre", "neighbour", "predicted"])
        acc = float((pred == labels).float().mean())
        return {"relative_position_pairs.png": (png, f"Relative position on {what}: a sampled pair (centre red, "
                                                     f"neighbour green), the two patches as the tower sees them, and "
                                                     f"the neighbour's predicted cell (blue); {acc:.0%} right here")}
