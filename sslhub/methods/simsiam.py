"""SimSiam: a Siamese network whose predictor matches the other view's projection behind a stop-gradient.

- [0] Chen, He. Exploring Simple Siamese Representation Learning. CVPR 2021,
  https://arxiv.org/abs/2011.10566

Two views ``x1, x2`` of each image; ``z = projector(backbone(x))`` (the paper's f) and
``p = predictor(z)`` (h).  With ``D(p, z) = −⟨p, z⟩ / (‖p‖·‖z‖)`` (eq. 1), the loss (eq. 3–4) is

    L = ½·D(p1, stopgrad(z2)) + ½·D(p2, stopgrad(z1)),

averaged over the batch (in [−1, 1]).  No negatives, no momentum encoder: the stop-gradient alone
prevents collapse (§4.1).  Collapse shows as ``z_std`` → 0: the per-dimension std of ``z/‖z‖``, which
stays near 1/√d for healthy outputs (Fig. 2).

Deviation: the paper does not decay the predictor's learning rate (§4.2, Table 1: 68.1% vs 67.7%
with decay, ImageNet 100 epochs); the shared trainer runs one cosine schedule for every parameter, so
here the predictor's lr decays with the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import normalized_std, projection_mlp
from sslhub.methods.registry import register_method


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, stopgrad(z))`` per row (eq. 1 with the stop-gradient of eq. 3).  ``(B, D), (B, D)`` → ``(B,)``."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return -(p * z).sum(dim=-1)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``mean_i ½·D(p1_i, z2_i) + ½·D(p2_i, z1_i)``; a batch mean (process mean = global batch)."""
    return (0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)).mean()


@dataclass
class SimSiamConfig(MethodConfig):
    # Projector f (paper §3 "Baseline settings", ImageNet): 3 layers, hidden and output 2048, BN after
    # every Linear including the output (which has no ReLU).  CIFAR-10 (appendix D): 2 layers.
    proj_hidden_dim: int = 2048
    proj_dim: int = 2048
    proj_layers: int = 3
    # Predictor h: a bottleneck 2048 → 512 → 2048, BN + ReLU on the hidden layer, none on the output.
    pred_hidden_dim: int = 512
    # The paper's ImageNet views (those of MoCo v2; its code): crop 0.2–1, flip, jitter p 0.8
    # (0.4, 0.4, 0.4, 0.1), grayscale 0.2, blur p 0.5 (σ ∈ [0.1, 2]).  CIFAR-10 (appendix D): no blur.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
        gray_p=0.2, blur_p=0.5))

    def __post_init__(self):
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers", "pred_hidden_dim"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("simsiam")
class SimSiam(Method):
    Config = SimSiamConfig
    paper = "Chen & He 2020, https://arxiv.org/abs/2011.10566"

    def __init__(self, backbone, cfg: SimSiamConfig):
        super().__init__(backbone, cfg)
        # Output BN without γ, β as in the paper's code (its output Linear's bias is dropped too).
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                                        last_bn=True, last_bn_affine=False)
        self.predictor = projection_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, layers=2)
        self.augment = self.view_pipeline(cfg.views)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x1 = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment(batch.images, batch.rng)
        # One view per forward, as the paper's pseudo-code (Algorithm 1): BN statistics of one view.
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # (B, proj_dim)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        return {"loss": loss, "z_std": normalized_std(torch.cat([z1, z2]))}
