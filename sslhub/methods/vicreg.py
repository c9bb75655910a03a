"""VICReg: Variance-Invariance-Covariance Regularization of two views' embeddings.

- [0] Bardes, Ponce, LeCun. VICReg: Variance-Invariance-Covariance Regularization for
  Self-Supervised Learning. ICLR 2022, https://arxiv.org/abs/2105.04906
- [1] The official code, https://github.com/facebookresearch/vicreg (``main_vicreg.py``)

Each image gives two views; ``z = expander(backbone(view))``, one forward per view as in [1] (so
batch-norm statistics are per view).  With ``Z, Z'`` the ``(N, d)`` embeddings of the global batch:

    loss = λ·s(Z, Z') + μ·[v(Z) + v(Z')]/2 + ν·[c(Z) + c(Z')]
    s(Z, Z') = 1/(N d) Σ_i ||z_i − z'_i||²                          (``F.mse_loss``)
    v(Z)     = 1/d Σ_j max(0, γ − sqrt(Var(z_·j) + ε))              (unbiased variance over the batch)
    c(Z)     = 1/d Σ_{i≠j} C(Z)_ij²,  C(Z) = 1/(N−1) Σ_n (z_n − z̄)(z_n − z̄)ᵀ

This follows the CODE [1], which halves the variance term (``std_loss = mean(relu(1 − std_x))/2 +
mean(relu(1 − std_y))/2``); the paper's formula and its Algorithm 1 do not.  The paper's numbers were
produced by that code with λ = μ = 25, ν = 1, so these coefficients reproduce them (μ as in the code); the paper's
formula is this one with ``std_coeff`` doubled.

Distributed as in [1]: s is computed on the local rows (the mean over processes of the local means is
the global mean); for v and c every process gathers all embeddings with gradients (``D.gather``, [1]'s
``FullGatherLayer``) and computes the full terms, so the mean of the per-process losses is the
single-process loss at batch N and so are the averaged gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """v(Z): hinge on the standard deviation of each dimension over the batch.  ``z: (N, d)``."""
    std = torch.sqrt(z.var(dim=0) + eps)  # (d,), unbiased variance
    return F.relu(gamma - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """c(Z): squared off-diagonal covariances over the batch, divided by d.  ``z: (N, d)``."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # (d, d)
    return off_diagonal(cov).pow(2).sum() / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, gamma: float = 1.0, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """VICReg over the global batch (see the module docstring).  ``z1, z2: (B, d)`` local, row i ↔ row i.

    Returns ``loss`` and the unweighted terms ``invariance`` s, ``variance`` (v(Z) + v(Z'))/2 and
    ``covariance`` c(Z) + c(Z').
    """
    invariance = F.mse_loss(z1, z2)  # local rows: the process mean is the global mean
    z1_all, z2_all = D.gather(z1), D.gather(z2)  # (N, d) each
    if z1_all.shape[0] < 2:
        raise InputError("vicreg needs at least 2 images in the (global) batch to estimate variances")
    variance = (variance_loss(z1_all, gamma, eps) + variance_loss(z2_all, gamma, eps)) / 2
    covariance = covariance_loss(z1_all) + covariance_loss(z2_all)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
            "covariance": covariance.detach(), "z_std": normalized_std(z1)}  # z_std → 0 on collapse


def _views(blur_p: float, solarize_p: float) -> ViewConfig:
    """The augmentations of [0]'s appendix and [1]'s ``augmentations.py`` (BYOL's), at 224 px."""
    return ViewConfig(size=224, scale=(0.08, 1.0), hflip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4,
                      saturation=0.2, hue=0.1, gray_p=0.2, blur_p=blur_p, solarize_p=solarize_p)


@dataclass
class VICRegConfig(MethodConfig):
    # Loss coefficients, [0] implementation details: λ = μ = 25, ν = 1 (with [1]'s halved variance term).
    sim_coeff: float = 25.0  # λ, invariance
    std_coeff: float = 25.0  # μ, variance
    cov_coeff: float = 1.0  # ν, covariance
    gamma: float = 1.0  # γ, target standard deviation ([0] eq. 1)
    eps: float = 1e-4  # ε in sqrt(Var + ε) ([0] eq. 1, [1])
    # Expander, [0] implementation details: 3 layers of 8192, Linear → BN → ReLU twice, then a Linear
    # without bias (as [1]).  The hidden Linears have no bias here ([1]: a bias, which the BN cancels).
    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    # [0] appendix / [1]: BYOL's asymmetric augmentations; the two views differ in blur and solarisation.
    views: ViewConfig = field(default_factory=lambda: _views(blur_p=1.0, solarize_p=0.0))  # t
    views2: ViewConfig = field(default_factory=lambda: _views(blur_p=0.1, solarize_p=0.2))  # t'

    def __post_init__(self):
        for name in ("sim_coeff", "std_coeff", "cov_coeff"):
            check(getattr(self, name) >= 0, name, "a loss coefficient must be ≥ 0 "
                  "(paper: sim_coeff=25, std_coeff=25, cov_coeff=1)")
        check(self.gamma > 0, "gamma", "the target standard deviation must be > 0 (paper: 1)")
        check(self.eps > 0, "eps", "must be > 0 so that sqrt(Var + eps) has a gradient at zero variance (paper: 1e-4)")
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("vicreg")
class VICReg(Method):
    Config = VICRegConfig
    paper = "Bardes et al. 2022, https://arxiv.org/abs/2105.04906"
    batch_coupled = True  # variance and covariance over the batch

    def __init__(self, backbone, cfg: VICRegConfig):
        super().__init__(backbone, cfg)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                                        bias=False)
        self.augment1 = self.view_pipeline(cfg.views)
        self.augment2 = self.view_pipeline(cfg.views2)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x1 = self.augment1(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment2(batch.images, batch.rng)
        z1 = self.projector(self.backbone(x1))  # (B, d): one forward per view, as [1]
        z2 = self.projector(self.backbone(x2))
        with torch.autocast(z1.device.type, enabled=False):  # variances and covariances in float32
            c = self.cfg
            return vicreg_loss(z1.float(), z2.float(), c.sim_coeff, c.std_coeff, c.cov_coeff, c.gamma, c.eps)
