"""BYOL: an online network predicts a slow-moving (EMA) target network's projection of another view.

- [0] Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
  Kavukcuoglu, Munos, Valko. Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning.
  NeurIPS 2020, https://arxiv.org/abs/2006.07733

Two views ``v = t(x)``, ``v' = t'(x)`` with asymmetric augmentations T, T' (Table 6).  The online
network gives ``q = predictor(projector(backbone(v)))``; the target, a momentum copy of backbone +
projector, gives ``z' = projector_ξ(backbone_ξ(v'))`` with no gradient.  Per sample (eq. 2)

    ℓ(q, z') = ‖q̄ − z̄'‖² = 2 − 2·⟨q, z'⟩ / (‖q‖·‖z'‖),

symmetrised over the two view orders (eq. 3: ``L + L~``) and averaged over the batch, so the loss
lies in [0, 8].  After each optimiser step ``ξ ← τ·ξ + (1 − τ)·θ`` with τ rising from τ_base to 1
along ``1 − (1 − τ_base)·(cos(πk/K) + 1)/2`` (§3.3).  The online backbone is exported.

Every view goes through the networks on its own (as the paper's code does), so batch-norm statistics
are those of one view of the batch; with several processes they are global (``convert_batchnorm``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import (
    cosine_momentum,
    ema_update_,
    momentum_copy,
    normalized_std,
    projection_mlp,
)
from sslhub.methods.registry import register_method


def regression_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``2 − 2·cos(q, z)`` per row, eq. 2.  ``q, z: (B, D)``; ``z`` is a target (no gradient) → ``(B,)``."""
    q = F.normalize(q.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2 - 2 * (q * z).sum(dim=-1)


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``mean_i ℓ(q1_i, z2_i) + ℓ(q2_i, z1_i)``; ``q`` online predictions, ``z`` target projections.

    A batch mean, so the mean of the per-process losses is the loss of the global batch.
    """
    return (regression_loss(q1, z2) + regression_loss(q2, z1)).mean()


@dataclass
class BYOLConfig(MethodConfig):
    tau_base: float = 0.996  # τ_base, EMA momentum at step 0, rising to 1 (paper §3.3, at batch 4096)
    proj_hidden_dim: int = 4096  # projector g: Linear → BN → ReLU → Linear (paper §3.3)
    proj_dim: int = 256  # projection size (paper: 256)
    pred_hidden_dim: int = 4096  # predictor q: same shape as g, proj_dim → 4096 → proj_dim (paper §3.3)
    # T and T' of Table 6 (ImageNet, 224 px; blur kernel 23 = 10% of the side, σ ∈ [0.1, 2]):
    # crop 0.08–1, flip, jitter p 0.8 (0.4, 0.4, 0.2, 0.1), grayscale 0.2; blur 1.0 / 0.1; solarize 0 / 0.2.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=1.0, solarize_p=0.0))
    views_prime: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=0.1, solarize_p=0.2))

    def __post_init__(self):
        check(0 <= self.tau_base <= 1, "tau_base", "must be in [0, 1] (the paper uses 0.996)")
        for name in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("byol")
class BYOL(Method):
    Config = BYOLConfig
    paper = "Grill et al. 2020, https://arxiv.org/abs/2006.07733"

    def __init__(self, backbone, cfg: BYOLConfig):
        super().__init__(backbone, cfg)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, layers=2)
        self.predictor = projection_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)
        self.target_backbone = momentum_copy(self.backbone)  # ξ: parameters in state_dict, not optimised
        self.target_projector = momentum_copy(self.projector)
        self.augment = self.view_pipeline(cfg.views)  # T
        self.augment_prime = self.view_pipeline(cfg.views_prime)  # T'

    def momentum(self, step: int, max_steps: int | None = None) -> float:
        """τ at ``step``.  Without a known length (outside the trainer) the schedule has not started: τ_base."""
        max_steps = self.max_steps if max_steps is None else max_steps
        if max_steps is None:
            return self.cfg.tau_base
        return cosine_momentum(self.cfg.tau_base, step, max_steps)

    def views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``v = t(x)``, ``v' = t'(x)``, both ``(B, 3, S, S)`` from the step's generator."""
        return self.augment(batch.images, batch.rng), self.augment_prime(batch.images, batch.rng)

    @torch.no_grad()
    def target(self, v: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(v))  # (B, proj_dim)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(batch)
        z1, z2 = self.projector(self.backbone(v1)), self.projector(self.backbone(v2))  # (B, proj_dim) each
        q1, q2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = self.target(v1), self.target(v2)
        loss = byol_loss(q1, q2, t1, t2)
        return {"loss": loss,
                "z_std": normalized_std(torch.cat([z1, z2]).detach()),  # ~1/√proj_dim healthy, 0 collapsed
                "momentum": torch.tensor(self.momentum(batch.step))}  # τ of this step's EMA update

    def on_step_end(self, step: int, max_steps: int) -> None:
        tau = self.momentum(step, max_steps)
        ema_update_(self.target_backbone, self.backbone, tau)
        ema_update_(self.target_projector, self.projector, tau)
