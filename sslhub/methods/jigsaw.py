"""Jigsaw puzzles: which of P permutations shuffled the 9 tiles of an image?

- [0] Noroozi, Favaro. Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles. ECCV 2016,
  https://arxiv.org/abs/1603.09246

Each image is cut into a 3×3 grid of cells and a tile is cropped at a random place inside each cell (gaps and
jitter: §3.1's 64-px tiles in 75-px cells of a 225-px crop), so edges do not continue from tile to tile.  A
permutation drawn from a fixed set of P shuffles the tiles; each tile, normalised on its own (zero mean, unit std
per channel: no shortcut through shared low-level statistics), goes through one shared-weight tower (the backbone,
then ``fc6``), the 9 features are concatenated in shuffled order and a P-way classifier (``fc7``, ``fc8``) names
the permutation.

Labels: shuffled position ``s`` holds the tile of grid cell ``perm[s]`` (``perm = permutations[label]``), so the
shuffle is undone by ``tiles = shuffled[:, argsort(perm)]``.

The permutation set (:func:`max_min_hamming_permutations`): the paper's greedy Algorithm 1 picks, one at a time
from all 9! permutations, the one farthest in Hamming distance from those already chosen; the set's *minimal*
pairwise distance is what makes the task hard (Table 3), so "farthest" here is the largest minimal distance to the
chosen set, ties broken by the largest average distance (the objective the paper's Algorithm 1 writes), then by the
seeded generator.  The set is drawn from ``perm_seed`` and kept in a buffer, so it is in every checkpoint: a resumed
run uses the set it started with, and every process of a distributed run builds the same one.  The greedy set's
minimal distance is 6 of 9 for P = 100 and 5 for P = 1000 (mean 8.0 for both), as measured by
``tests/test_patch_context.py``; greedy is not optimal — the 504 elements of PGL(2, 8) acting on 9 points are
pairwise 7 apart, and no set of more than 72 permutations of 9 items can be 8 apart — but it is the paper's.

Geometry on small images (the CIFAR-10 recipe): 32-px views give 10-px cells holding 8-px tiles (the paper's
64/75 ≈ 0.85) that may sit anywhere in their cell (±1 px) and a grid origin drawn from the 2 px of slack.  The
exported encoder is the tower alone, applied to whole images at ``encoder.image_size`` (32 px, 4× the tile side)
with the dataset normalisation every export uses.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.data.grid import PatchGuards, RowDraws, sample_positions, take_patches
from sslhub.methods.base import Batch
from sslhub.methods.common import projection_mlp
from sslhub.methods.patch_context import PatchContextConfig, PatchTowerMethod
from sslhub.methods.registry import register_method
from sslhub.publish.pictures import image_grid

N_TILES = 9


@functools.lru_cache(maxsize=8)
def max_min_hamming_permutations(n_perms: int, seed: int = 0, n_items: int = N_TILES) -> np.ndarray:
    """``n_perms`` distinct permutations of ``range(n_items)`` ``(n_perms, n_items)`` int64, chosen greedily for the
    largest minimal pairwise Hamming distance (ties: largest mean distance to the chosen ones, then ``seed``'s
    generator).  Deterministic in ``(n_perms, seed)``; ~1 s for 100, ~10 s for 1000 of 9! candidates."""
    total = 1
    for k in range(2, n_items + 1):
        total *= k
    if not 1 <= n_perms <= total:
        raise ValueError(f"n_perms must be in 1 … {total} (all permutations of {n_items}), got {n_perms}")
    cands = np.array(list(itertools.permutations(range(n_items))), dtype=np.int8)  # (n!, n), lexicographic
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(cands)))]
    d = (cands != cands[chosen[0]]).sum(1, dtype=np.int64)
    min_d, sum_d = d.copy(), d.copy()
    min_d[chosen[0]] = -1
    for _ in range(n_perms - 1):
        best = np.flatnonzero(min_d == min_d.max())
        best = best[sum_d[best] == sum_d[best].max()]
        j = int(best[rng.integers(len(best))])
        chosen.append(j)
        d = (cands != cands[j]).sum(1, dtype=np.int64)
        np.minimum(min_d, d, out=min_d)
        sum_d += d
        min_d[chosen] = -1
    return cands[chosen].astype(np.int64)


def shuffle_tiles(tiles: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``tiles (n, 9, …)`` in grid order, ``perms (n, 9)`` → shuffled tiles: position ``s`` holds tile ``perms[:, s]``."""
    idx = perms.to(tiles.device).view(*perms.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, idx)


@dataclass
class JigsawConfig(PatchContextConfig):
    patch_frac: float = 0.85  # tile side / cell side; paper: 64-px tiles in 75-px cells
    jitter_frac: float = 1.0  # each tile anywhere in its cell (paper: a random 64-px crop of the 75-px cell)
    guards: PatchGuards = field(default_factory=lambda: PatchGuards(colour="none", pixelate_p=0.0))  # paper: none
    hidden_dim: int = 1024  # fc7 on the 9 concatenated tiles (paper: 4096)
    # Paper §3.1 and its code: a random crop of the image, random colour jitter of the channels and grayscale on
    # 30 % of the images (against chromatic aberration), then per-tile normalisation.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=32, scale=(0.6, 1.0), hflip_p=0.0, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
        hue=0.05, gray_p=0.3, blur_p=0.0))
    num_permutations: int = 100  # P (paper: 1000 in its main results, 100 … 1000 in Table 3; 100 here: 1.3 k CIFAR
    #                               images a class would be thin for 1000 classes in a short run)
    perm_seed: int = 0  # the permutation set is drawn from this seed, then kept in the checkpoint
    tile_dim: int = 512  # fc6, per tile and shared (paper: 512 on AlexNet; 0 → the backbone's features)

    def __post_init__(self):
        super().__post_init__()
        check(2 <= self.num_permutations <= 362880, "num_permutations",
              "must be in 2 … 362880 = 9! (the paper: 100 … 1000)")
        check(self.perm_seed >= 0, "perm_seed", "must be a non-negative integer")
        check(self.tile_dim >= 0, "tile_dim", "must be >= 0 (0: the backbone's features go straight to fc7)")


@register_method("jigsaw")
class Jigsaw(PatchTowerMethod):
    Config = JigsawConfig
    paper = "Noroozi & Favaro 2016, https://arxiv.org/abs/1603.09246"

    def __init__(self, backbone, cfg: JigsawConfig):
        super().__init__(backbone, cfg, cfg.tile_dim)
        perms = max_min_hamming_permutations(cfg.num_permutations, cfg.perm_seed)
        self.register_buffer("permutations", torch.from_numpy(perms.copy()))  # (P, 9): in every checkpoint
        self.classifier = projection_mlp(N_TILES * self.patch_dim, cfg.hidden_dim, cfg.num_permutations)  # fc7, fc8

    def tiles(self, x: torch.Tensor, draws: RowDraws | None) -> torch.Tensor:
        """Views ``(n, 3, S, S)`` in ``[0, 1]`` → the 9 tiles in grid order ``(n, 9, 3, p, p)`` (``draws=None``:
        centred, no jitter)."""
        geom = self.geometry(x.shape[-1])
        tops, lefts = sample_positions(geom, draws, count=x.shape[0])
        return take_patches(x, tops, lefts, geom.patch)

    def logits(self, shuffled: torch.Tensor) -> torch.Tensor:
        """Shuffled tiles ``(n, 9, 3, p, p)`` in ``[0, 1]`` → ``(n, P)``, each tile normalised on its own."""
        return self.classifier(self.tower(shuffled, own_statistics=True).flatten(1)).float()

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        draws = RowDraws(batch.sample_seed(), batch.sample_offset(), batch.images.shape[0])  # before rng
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S) in [0, 1]
        tiles = self.tiles(x, draws)
        labels = draws.randint(0, self.cfg.num_permutations).to(x.device)  # (B,)
        shuffled = self.guard(shuffle_tiles(tiles, self.permutations[labels]), draws)
        logits = self.logits(shuffled)
        return {"loss": F.cross_entropy(logits, labels),
                "jigsaw_acc": (logits.argmax(1) == labels).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
        """Pretext accuracy on held-out images: centred tiles, one permutation per image drawn from ``seed`` (the
        same test for every checkpoint); chance is 1 / P."""
        g = torch.Generator().manual_seed(seed)
        correct = total = 0
        for i in range(0, images.shape[0], batch_size):
            tiles = self.tiles(self.eval_views(images[i : i + batch_size]), None)
            k = torch.randint(0, self.cfg.num_permutations, (tiles.shape[0],), generator=g).to(tiles.device)
            correct += int((self.logits(shuffle_tiles(tiles, self.permutations[k])).argmax(1) == k).sum())
            total += k.numel()
        return {"jigsaw_acc": correct / max(total, 1)}

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, what: str = "held-out images", seed: int = 0) -> dict[str, tuple[bytes, str]]:
        """The puzzle as training draws it: the view, its tiles shuffled (as the tower sees them, before per-tile
        normalisation), and the tiles put back by the predicted permutation's inverse."""
        x = self.eval_views(images[:8])
        n = x.shape[0]
        draws = RowDraws(seed, 0, n)
        tiles = self.tiles(x, draws)
        k = draws.randint(0, self.cfg.num_permutations).to(x.device)
        shuffled = self.guard(shuffle_tiles(tiles, self.permutations[k]), draws)
        pred = self.logits(shuffled).argmax(1)
        restored = shuffle_tiles(shuffled, self.permutations[pred].argsort(1))
        geom = self.geometry(x.shape[-1])
        png = image_grid([self.to_uint8(x), mosaic(shuffled, geom.stride), mosaic(restored, geom.stride)],
                         ["image", "shuffled", "model's order"])
        acc = float((pred == k).float().mean())
        return {"jigsaw_puzzles.png": (png, f"Jigsaw puzzles on {what}: each image, its 9 tiles shuffled by one of "
                                            f"{self.cfg.num_permutations} permutations, and the tiles put back in "
                                            f"the order the model predicts ({acc:.0%} of the permutations right here)")}


def mosaic(tiles: torch.Tensor, cell: int, gap_value: float = 1.0) -> torch.Tensor:
    """Tiles ``(n, 9, 3, p, p)`` in ``[0, 1]`` laid out row-major on a 3×3 grid of ``cell``-px cells, white gaps;
    uint8 ``(n, 3, 3·cell, 3·cell)``."""
    n, _, c, p, _ = tiles.shape
    out = torch.full((n, c, 3 * cell, 3 * cell), gap_value, dtype=tiles.dtype, device=tiles.device)
    off = (cell - p) // 2
    for s in range(N_TILES):
        r, col = divmod(s, 3)
        out[:, :, r * cell + off : r * cell + off + p, col * cell + off : col * cell + off + p] = tiles[:, s]
    return PatchTowerMethod.to_uint8(out)
