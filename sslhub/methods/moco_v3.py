"""MoCo v3: contrast each query with the momentum encoder's keys of the same (global) batch; no queue.

- [0] Chen, Xie, He. An Empirical Study of Training Self-Supervised Vision Transformers. ICCV 2021,
  https://arxiv.org/abs/2104.02057

Two views ``x1, x2``; queries ``q = predictor(projector(backbone(x)))``, keys ``k = projector_m(backbone_m(x))``
from the momentum encoder (backbone + projector, no predictor) without gradient.  With ``q, k``
L2-normalised and the keys of the *global* batch (Algorithm 1),

    ctr(q, k) = 2τ · CE(q·kᵀ/τ, labels),   labels_i = rank·B + i   (the key of the same image),
    L = ctr(q1, k2) + ctr(q2, k1).

The factor 2τ (Algorithm 1) makes the gradient with respect to the similarities q·k independent of
τ's scale.  After each step ``θ_m ← m·θ_m + (1 − m)·θ`` with m rising from ``momentum`` (0.99) to 1
along a half cosine (the official code's ``--moco-m-cos``; BYOL's schedule, ``cosine_momentum``).

ViT stability trick (§4.2): a *random* patch projection, frozen at its initialisation.  With
``freeze_patch_embed=True`` and a timm backbone with a ``patch_embed`` (ViT, DeiT, …) the patch
embedding gets ``requires_grad=False``, so the optimiser never sees it; on a ResNet it does nothing.
Deviation: the paper's ViT has fixed 2-D sin-cos position embeddings; here timm's learned ones stay,
so the export remains a plain timm model.

Every view goes through the networks on its own (as in the official code); BN is global over the
processes, the momentum encoder's included (the official code converts the whole model to SyncBN).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import sslhub.distributed as D
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


def ctr_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``2τ · CE(q·kᵀ/τ, rank·B + arange(B))`` (Algorithm 1).  Returns the loss and the logits.

    ``q: (B, D)`` this process's queries, ``k: (N, D)`` keys of the global batch (gathered, no gradient),
    both normalised here.  A per-query mean, so the mean of the per-process losses is the global loss.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    logits = q @ k.T / temperature  # (B, N)
    labels = D.rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature), logits


@dataclass
class MoCoV3Config(MethodConfig):
    temperature: float = 0.2  # τ: 0.2 for ViT (§4 / appendix); the paper's ResNet-50 uses 1.0
    momentum: float = 0.99  # m at step 0, rising to 1 along a half cosine (paper: 0.99)
    proj_hidden_dim: int = 4096  # hidden width of both MLPs (paper: 4096)
    proj_dim: int = 256  # output width of both MLPs (paper: 256)
    proj_layers: int = 3  # paper: 3-layer projector (the official ResNet-50 code uses 2)
    pred_hidden_dim: int = 4096  # 2-layer predictor 256 → 4096 → 256 (paper)
    # Paper: "all layers in both MLPs have BN"; the projector's last BN has no affine γ, β (official code).
    # The official ResNet-50 code leaves the predictor's output without BN (False).
    pred_last_bn: bool = True
    freeze_patch_embed: bool = True  # §4.2: random, frozen patch projection (ViT-like backbones only)
    # BYOL's asymmetric augmentations (the paper's appendix, ImageNet 224 px; official code --crop-min
    # 0.08 for ViT, 0.2 for ResNet): crop, flip, jitter p 0.8 (0.4, 0.4, 0.2, 0.1), grayscale 0.2;
    # blur p 1.0 / 0.1, solarize p 0 / 0.2 for the first / second view.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=1.0, solarize_p=0.0))
    views2: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=0.1, solarize_p=0.2))

    def __post_init__(self):
        check(self.temperature > 0, "temperature", "must be > 0 (the paper: 0.2 for ViT, 1.0 for ResNet)")
        check(0 <= self.momentum <= 1, "momentum", "must be in [0, 1] (the paper: 0.99)")
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers", "pred_hidden_dim"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("moco_v3")
class MoCoV3(Method):
    Config = MoCoV3Config
    paper = "Chen et al. 2021, https://arxiv.org/abs/2104.02057"
    batch_coupled = True  # in-batch negatives (the other keys of the batch)

    def __init__(self, backbone, cfg: MoCoV3Config):
        super().__init__(backbone, cfg)
        if cfg.freeze_patch_embed and hasattr(backbone.model, "patch_embed"):
            backbone.model.patch_embed.requires_grad_(False)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                                        last_bn=True, last_bn_affine=False, bias=False)
        self.predictor = projection_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2,
                                        last_bn=cfg.pred_last_bn, last_bn_affine=False, bias=False)
        self.momentum_backbone = momentum_copy(self.backbone)  # θ_m: in state_dict, never optimised
        self.momentum_projector = momentum_copy(self.projector)
        self.augment1 = self.view_pipeline(cfg.views)
        self.augment2 = self.view_pipeline(cfg.views2)

    def momentum(self, step: int, max_steps: int | None = None) -> float:
        """m at ``step``.  Without a known length (outside the trainer) the schedule has not started."""
        max_steps = self.max_steps if max_steps is None else max_steps
        if max_steps is None:
            return self.cfg.momentum
        return cosine_momentum(self.cfg.momentum, step, max_steps)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder keys of the global batch ``(N, proj_dim)``."""
        return D.gather_nograd(self.momentum_projector(self.momentum_backbone(x)))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x1 = self.augment1(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment2(batch.images, batch.rng)
        q1 = self.predictor(self.projector(self.backbone(x1)))  # (B, proj_dim)
        q2 = self.predictor(self.projector(self.backbone(x2)))
        k1, k2 = self.keys(x1), self.keys(x2)  # (N, proj_dim)
        loss_12, logits = ctr_loss(q1, k2, self.cfg.temperature)
        loss_21, _ = ctr_loss(q2, k1, self.cfg.temperature)
        labels = D.rank() * q1.shape[0] + torch.arange(q1.shape[0], device=q1.device)
        return {"loss": loss_12 + loss_21,
                "acc": (logits.detach().argmax(dim=1) == labels).float().mean(),  # key of the same image first
                "z_std": normalized_std(q1),  # ~1/√proj_dim healthy, 0 when collapsed
                "momentum": torch.tensor(self.momentum(batch.step))}  # m of this step's update

    def on_step_end(self, step: int, max_steps: int) -> None:
        m = self.momentum(step, max_steps)
        ema_update_(self.momentum_backbone, self.backbone, m)
        ema_update_(self.momentum_projector, self.projector, m)
