"""DINO: self-distillation with no labels, a momentum teacher, centring + sharpening and multi-crop.

- [0] Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. Emerging Properties in Self-Supervised
  Vision Transformers. ICCV 2021, https://arxiv.org/abs/2104.14294
- [1] The official code, https://github.com/facebookresearch/dino (``main_dino.py``, ``DINOHead``):
  the defaults below are its argparse defaults unless a comment says otherwise.

Each image gives 2 global crops and ``n_local_views`` local crops.  The student g_s (backbone + DINO head)
sees every crop, the teacher g_t (an EMA of the student) only the 2 global ones.  With K outputs,

    P_t(x) = softmax((g_t(x) − c) / τ_t),   log P_s(x) = log_softmax(g_s(x) / τ_s)
    L = 1 / (2 (V − 1)) · Σ_{i ∈ global} Σ_{j ≠ i} mean_b H(P_t(x_i), P_s(x_j)),  H(a, b) = −Σ_k a_k log b_k

(V crops in all).  The centre c ← m_c·c + (1 − m_c)·mean(g_t(x)) over the teacher outputs of the global
batch (centring keeps one output from dominating, a low τ_t sharpens: the two together avoid collapse,
paper §3.1 and Fig. 7).  The teacher follows θ_t ← m·θ_t + (1 − m)·θ_s with m going 0.996 → 1 on a cosine.

Schedules given in epochs (teacher-temperature warm-up, frozen last layer) need ``steps_per_epoch`` from
:meth:`Method.configure`; outside the trainer (``steps_per_epoch`` None) the warm-up counts as finished
(τ_t = ``teacher_temp``) and the last layer as not frozen.

Deviations from [1], with their reason:
- the teacher temperature rises linearly per *step* over the warm-up; [1] steps it once per epoch;
- the centre is updated once per optimiser step (in ``on_step_end``) from every teacher output of that step,
  so gradient accumulation equals a bigger batch; [1] (no accumulation) updates it inside the loss;
- the weight-decay schedule 0.04 → 0.4 of [1] is not in the trainer: the recipe's constant value is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import (
    cosine_momentum,
    ema_update_,
    forward_multicrop,
    momentum_copy,
)
from sslhub.methods.registry import register_method


class DINOHead(nn.Module):
    """MLP (Linear → [BN] → GELU, ×(layers − 1), → Linear to the bottleneck), L2 normalisation, then a
    weight-normalised Linear without bias to ``out_dim``: ``W_k = g_k · v_k / ‖v_k‖`` per output k.

    ``norm_last_layer``: g is fixed to 1 (not trained), so every row of W has norm 1 ([1]'s default).
    Parameter names ``last_layer.weight_g`` / ``weight_v`` are those of [1]'s ``nn.utils.weight_norm``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            d = hidden_dim
        mods.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp.modules():  # [1]: truncated normal, std 0.02, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Module()
        v = torch.empty(out_dim, bottleneck_dim)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's own initialisation, as in [1]
        self.last_layer.weight_v = nn.Parameter(v)  # (K, bottleneck)
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.frozen_last_layer = False  # set per step by the method: the last layer then gets no gradient

    def last_weight(self) -> torch.Tensor:
        """The effective last-layer weight ``g · v / ‖v‖`` (K, bottleneck)."""
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        if self.frozen_last_layer:
            v, g = v.detach(), g.detach()
        return g * F.normalize(v, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(h), dim=-1)  # (N, bottleneck), unit norm
        return F.linear(z, self.last_weight())  # (N, K)


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centring + sharpening: ``softmax((g_t − c) / τ_t)`` row-wise, no gradient.  (N, K) → (N, K)."""
    return F.softmax((teacher_out.detach().float() - center) / teacher_temp, dim=-1)


def dino_loss(student_out: torch.Tensor, teacher_p: torch.Tensor, n_crops: int,
              student_temp: float = 0.1) -> torch.Tensor:
    """Cross-entropy of every student crop against every teacher global crop but its own.

    ``student_out``: (V·B, K) logits, crop-major (crop v is rows v·B … v·B + B − 1; the 2 global crops
    first).  ``teacher_p``: (G·B, K) teacher probabilities of the G global crops, same order.
    Mean over the B samples and the G·(V − 1) pairs (i, j ≠ i).
    """
    b = student_out.shape[0] // n_crops
    n_global = teacher_p.shape[0] // b
    if n_crops < 2 or b * n_crops != student_out.shape[0] or n_global * b != teacher_p.shape[0] \
            or not 1 <= n_global <= n_crops:
        raise ValueError(f"student rows {student_out.shape[0]} and teacher rows {teacher_p.shape[0]} do not "
                         f"split into n_crops={n_crops} (>= 2) student crops and 1..n_crops teacher crops")
    log_s = F.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)  # V × (B, K)
    log_s_sum = torch.stack(log_s).sum(0)  # (B, K): Σ_j log P_s(x_j)
    total = student_out.new_zeros((), dtype=torch.float32)
    for i, p in enumerate(teacher_p.chunk(n_global)):  # Σ_{j ≠ i} = Σ_j − the term j = i
        total = total - (p * (log_s_sum - log_s[i])).sum(-1).mean()
    return total / (n_global * (n_crops - 1))


@dataclass
class DINOConfig(MethodConfig):
    out_dim: int = 65536  # K, the head's output dimension ([1]: 65536)
    hidden_dim: int = 2048  # head MLP width ([1]: 2048)
    bottleneck_dim: int = 256  # L2-normalised bottleneck before the last layer ([1]: 256)
    head_layers: int = 3  # [1]: 3-layer MLP
    use_bn_in_head: bool = False  # [1]: no BN in the head (ViT); True is [1]'s option for convnets
    norm_last_layer: bool = True  # [1]: weight-norm magnitude fixed to 1 (False: trained, less stable)
    momentum_teacher: float = 0.996  # base m of the EMA teacher, cosine to 1 (paper §3.1; [1]: 0.9995 at batch 256)
    student_temp: float = 0.1  # τ_s (paper §3.2)
    # τ_t: linear warm-up 0.04 → 0.07 over the first 30 epochs (paper §3.2; its appendix: a constant
    # τ_t > 0.06 collapses).  [1]'s argparse default is a constant 0.04, its README's better runs the warm-up.
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    center_momentum: float = 0.9  # m_c of the centre, eq. (4) ([1]: 0.9)
    freeze_last_layer_epochs: float = 1.0  # last layer not updated during the first epoch ([1]: 1)
    n_local_views: int = 8  # local crops per image ([1]: 8; paper Table 8 compares 0, 2, 6 and 10)
    # The 2 global crops ([1] DataAugmentationDINO, BYOL's asymmetric pipeline): 224 px, scale 0.4–1,
    # flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2; blur p 1.0 on the first crop,
    # blur p 0.1 and solarize p 0.2 on the second.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.4, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=1.0, solarize_p=0.0))
    views2: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.4, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=0.1, solarize_p=0.2))
    # Local crops ([1]): 96 px, scale 0.05–0.4, same jitter, blur p 0.5.
    local_views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=96, scale=(0.05, 0.4), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
        gray_p=0.2, blur_p=0.5, solarize_p=0.0))

    def __post_init__(self):
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check(getattr(self, name) > 0, name,
                  "a temperature must be > 0 (the paper uses τ_s = 0.1, τ_t = 0.04 to 0.07)")
        for name in ("momentum_teacher", "center_momentum"):
            check(0 <= getattr(self, name) <= 1, name,
                  "a momentum must lie in [0, 1] (paper: 0.996 for the teacher, 0.9 for the centre)")
        for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            check(getattr(self, name) >= 0, name, "a number of epochs must be >= 0")
        check(self.n_local_views >= 0, "n_local_views",
              "the number of local crops must be >= 0 (0 = the 2 global crops only)")


@register_method("dino")
class DINO(Method):
    Config = DINOConfig
    paper = "Caron et al. 2021, https://arxiv.org/abs/2104.14294"
    n_global = 2  # global crops: the teacher's inputs

    def __init__(self, backbone, cfg: DINOConfig):
        super().__init__(backbone, cfg)
        self.head = DINOHead(backbone.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.use_bn_in_head, cfg.norm_last_layer)
        self.teacher_backbone = momentum_copy(backbone)  # starts equal to the student ([1])
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(cfg.out_dim))  # c (K,)
        self.augment = self.view_pipeline(cfg.views)
        self.augment2 = self.view_pipeline(cfg.views2)
        self.augment_local = self.view_pipeline(cfg.local_views)
        # Teacher outputs of this step (sum over rows, row count) for the centre update in on_step_end.
        self._teacher_sum: torch.Tensor | None = None
        self._teacher_rows = 0

    # ---------------------------------------------------------------- schedules (from the step number)
    def teacher_temperature(self, step: int) -> float:
        """τ_t: linear from ``warmup_teacher_temp`` at step 0 to ``teacher_temp`` after the warm-up."""
        c = self.cfg
        warm = c.warmup_teacher_temp_epochs * self.steps_per_epoch if self.steps_per_epoch else 0
        if step >= warm:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / warm

    def last_layer_frozen(self, step: int) -> bool:
        """True during the first ``freeze_last_layer_epochs`` epochs (never when steps_per_epoch is unknown)."""
        return bool(self.steps_per_epoch) and step < self.cfg.freeze_last_layer_epochs * self.steps_per_epoch

    def teacher_momentum(self, step: int, max_steps: int | None) -> float:
        return cosine_momentum(self.cfg.momentum_teacher, step, max_steps) if max_steps else self.cfg.momentum_teacher

    # ---------------------------------------------------------------- training
    def crops(self, batch: Batch) -> list[torch.Tensor]:
        """The 2 global crops, then the local ones: ``[(B, 3, S, S)] * 2 + [(B, 3, s, s)] * n_local``."""
        g = batch.rng
        out = [self.augment(batch.images, g), self.augment2(batch.images, g)]
        return out + [self.augment_local(batch.images, g) for _ in range(self.cfg.n_local_views)]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.cfg
        x = self.crops(batch)
        self.head.frozen_last_layer = self.last_layer_frozen(batch.step)
        s_out = self.head(forward_multicrop(self.backbone, x)).float()  # (V·B, K)
        with torch.no_grad():
            t_out = self.teacher_head(forward_multicrop(self.teacher_backbone, x[: self.n_global])).float()  # (2B, K)
        temp = self.teacher_temperature(batch.step)
        p_t = teacher_probs(t_out, self.center, temp)  # (2B, K)
        loss = dino_loss(s_out, p_t, len(x), c.student_temp)
        with torch.no_grad():
            rows = t_out.sum(0)
            self._teacher_sum = rows if self._teacher_sum is None else self._teacher_sum + rows
            self._teacher_rows += t_out.shape[0]
            entropy = -(p_t * torch.log(p_t.clamp_min(1e-30))).sum(-1).mean()  # H(P_t): → 0 = one-hot collapse
        return {"loss": loss,
                "teacher_entropy": entropy,
                "kl": loss.detach() - entropy,  # mean KL(P_t ‖ P_s) over the pairs: → 0 = uniform collapse
                "teacher_temp": torch.tensor(temp),
                "momentum": torch.tensor(self.teacher_momentum(batch.step, self.max_steps))}

    @torch.no_grad()
    def update_center(self) -> None:
        """``c ← m_c·c + (1 − m_c)·mean`` of this step's teacher outputs over every process."""
        if self._teacher_sum is None:
            return
        count = self._teacher_sum.new_tensor([float(self._teacher_rows)])
        stats = D.all_reduce_sum(torch.cat([self._teacher_sum, count]))  # (K + 1,)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(stats[:-1] / stats[-1], alpha=1.0 - m)
        self._teacher_sum, self._teacher_rows = None, 0

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.update_center()
        m = self.teacher_momentum(step, max_steps)
        ema_update_(self.teacher_backbone, self.backbone, m)
        ema_update_(self.teacher_head, self.head, m)

    def exported_backbone(self):
        """The teacher's backbone: the paper evaluates (k-NN, linear) the teacher."""
        return self.teacher_backbone
