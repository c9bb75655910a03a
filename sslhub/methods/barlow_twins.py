"""Barlow Twins: make the cross-correlation matrix of two views' embeddings the identity.

- [0] Zbontar, Jing, Misra, LeCun, Deny. Barlow Twins: Self-Supervised Learning via Redundancy
  Reduction. ICML 2021, https://arxiv.org/abs/2103.03230
- [1] The official code, https://github.com/facebookresearch/barlowtwins (``main.py``)

Each image gives two views; ``z = projector(backbone(view))``, one forward per view as in [1].  Each
view's embeddings are normalised along the batch (a BN without affine parameters, [1]'s ``self.bn``:
zero mean, unit biased variance per dimension over the global batch), then with N the global batch

    C_ij = 1/N Σ_n ẑ_n,i ẑ'_n,j                                 ([0] eq. 2)
    L    = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²               ([0] eq. 1)

Distributed: each process sums its own ``ẑᵀẑ'`` and a differentiable all-reduce (``D.all_reduce_sum``)
gives every process the full C, so every process computes the same, full loss.  ([1] all-reduces
without gradient, so its gradients are 1/P of this loss's; here the averaged gradients are exactly
those of one process at batch N.)  The BN is made global by the trainer's ``convert_batchnorm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import (
    normalized_std,
    off_diagonal,
    projection_mlp,
)
from sslhub.methods.registry import register_method


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """C over the global batch.  ``z1, z2: (B, d)`` local, already normalised along the global batch."""
    n = D.all_reduce_sum(torch.tensor(float(z1.shape[0]), device=z1.device))  # N, the global batch
    return D.all_reduce_sum(z1.T @ z2) / n  # (d, d)


def barlow_twins_loss(c: torch.Tensor, lambd: float = 0.0051) -> dict[str, torch.Tensor]:
    """``L`` of the cross-correlation matrix ``c: (d, d)``, with its two parts (unweighted)."""
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return {"loss": on_diag + lambd * off_diag, "on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


def _views(blur_p: float, solarize_p: float) -> ViewConfig:
    """The augmentations of [0] and [1] ``main.py`` (BYOL's), at 224 px."""
    return ViewConfig(size=224, scale=(0.08, 1.0), hflip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4,
                      saturation=0.2, hue=0.1, gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p)


@dataclass
class BarlowTwinsConfig(MethodConfig):
    lambd: float = 0.0051  # λ, weight of the redundancy-reduction term: [1]'s 0.0051 ([0]: 5e-3)
    # The minimised loss is scale_loss · L (1: the paper's).  With LARS, scaling the loss and the weight decay
    # by s leaves the weights' updates unchanged and scales those of the biases and BN parameters (no trust
    # ratio) by s: s = 0.0048 / 0.2 = 0.024 with weight_decay × 0.024 is [0]'s two learning rates (0.2 for
    # weights, 0.0048 for biases and BN) with our single one.  See recipes/barlow_twins_cifar10.yaml.
    scale_loss: float = 1.0
    # Projector ([0] implementation details): 3 layers of 8192, Linear → BN → ReLU twice, then a Linear;
    # every Linear without bias, as [1].
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    # [0] / [1]: BYOL's asymmetric augmentations; the two views differ in blur and solarisation.
    views: ViewConfig = field(default_factory=lambda: _views(blur_p=1.0, solarize_p=0.0))  # Y^A
    views2: ViewConfig = field(default_factory=lambda: _views(blur_p=0.1, solarize_p=0.2))  # Y^B

    def __post_init__(self):
        check(self.lambd >= 0, "lambd", "the off-diagonal weight must be ≥ 0 (paper: 0.0051)")
        check(self.scale_loss > 0, "scale_loss", "must be > 0 (1 is the paper's loss)")
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("barlow_twins")
class BarlowTwins(Method):
    Config = BarlowTwinsConfig
    paper = "Zbontar et al. 2021, https://arxiv.org/abs/2103.03230"
    batch_coupled = True  # cross-correlation over the batch

    def __init__(self, backbone, cfg: BarlowTwinsConfig):
        super().__init__(backbone, cfg)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                                        bias=False)
        self.bn = nn.BatchNorm1d(cfg.proj_dim, affine=False)  # normalisation along the batch, per view
        self.augment1 = self.view_pipeline(cfg.views)
        self.augment2 = self.view_pipeline(cfg.views2)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.images.shape[0] * D.world_size() < 2:
            raise InputError("barlow_twins needs at least 2 images in the (global) batch to normalise along it")
        x1 = self.augment1(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment2(batch.images, batch.rng)
        z1 = self.projector(self.backbone(x1))  # (B, d): one forward per view, as [1]
        z2 = self.projector(self.backbone(x2))
        with torch.autocast(z1.device.type, enabled=False):  # normalisation and C in float32
            c = cross_correlation(self.bn(z1.float()), self.bn(z2.float()))  # (d, d)
            out = barlow_twins_loss(c, self.cfg.lambd)
        out["loss"] = self.cfg.scale_loss * out["loss"]
        out["c_diag"] = torch.diagonal(c).detach().mean()  # → 1 as the two views' embeddings agree
        out["z_std"] = normalized_std(z1)  # → 0 on collapse
        return out
