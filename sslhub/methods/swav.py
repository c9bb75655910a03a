"""SwAV: online clustering with swapped predictions of Sinkhorn codes, and multi-crop.

- [0] Caron, Misra, Mairal, Goyal, Bojanowski, Joulin. Unsupervised Learning of Visual Features by
  Contrasting Cluster Assignments. NeurIPS 2020, https://arxiv.org/abs/2006.09882
- [1] The official code, https://github.com/facebookresearch/swav (``main_swav.py``, ``scripts/``)

Each image gives 2 global crops and ``n_local_views`` small crops.  ``z = normalize(projector(
backbone(crop)))``; the scores against the K unit-norm prototypes are ``s = z·Cᵀ``.  For each global
crop i (``crops_for_assign``) the codes ``q_i`` come from Sinkhorn–Knopp on ``exp(s_i / ε)`` over the
*global* batch (no gradient), so every prototype receives the same share of the batch (§3.1, Eq. 3).
Every other crop v predicts them ([0] Eq. 1–2):

    L = 1/|A| Σ_{i∈A} 1/(V−1) Σ_{v≠i} mean_b [ −Σ_k q_i[b,k] · log softmax(s_v[b] / τ)_k ]

Prototypes are renormalised to unit length before each step and frozen (no gradient) during the
first epoch ([0] appendix A.1).  An optional queue of global-crop embeddings from previous steps
adds columns to the Sinkhorn problem when batches are small ([1]: 3840 from epoch 15 at batch 256).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import forward_multicrop, projection_mlp
from sslhub.methods.registry import register_method

N_GLOBAL_VIEWS = 2  # the two full-resolution crops ([0] §3.2)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes ``(B, K)`` for this process's scores ``(B, K)``; the sums run over every process.

    The official ``distributed_sinkhorn`` [1]: ``Q = exp(scores / ε)ᵀ`` (K × B) divided by its global
    sum, then ``iterations`` × [each row ÷ its global sum ÷ K, each column ÷ its sum ÷ B_global], and
    finally ``Q · B_global``: each returned code sums to exactly 1 over the prototypes, and each
    prototype's total over the global batch tends to B_global / K as the iterations grow.

    Every row is first shifted by its global maximum, ``exp((s − max_b s) / ε)``: a per-prototype factor
    that the first row normalisation cancels exactly, so the result is the official one without
    overflow for small ε.  Each process may hold a different number of columns.
    """
    s = scores.detach().float().T  # (K, B)
    row_max = D.gather_nograd(s.max(dim=1).values[None]).max(dim=0).values  # (K,), global
    q = torch.exp((s - row_max[:, None]) / epsilon)  # (K, B)
    k = q.shape[0]
    n = D.all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))  # B_global
    q /= D.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= D.all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: total 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total 1/B_global
        q /= n
    q *= n
    return q.T  # (B, K)


def swapped_prediction_loss(scores: torch.Tensor, codes: torch.Tensor, crops_for_assign: Sequence[int],
                            temperature: float = 0.1) -> torch.Tensor:
    """``scores (V, B, K)`` of every crop (with gradient); ``codes (A, B, K)``, ``codes[a]`` the codes of
    crop ``crops_for_assign[a]``.  Cross-entropy of each code against the softmax(scores / τ) of every
    other crop, averaged over those V − 1 crops, the batch and the assigned crops (module docstring).
    The batch mean is local, so the mean over processes is the loss of the global batch."""
    log_p = F.log_softmax(scores / temperature, dim=-1)  # (V, B, K)
    total = scores.new_zeros(())
    for a, i in enumerate(crops_for_assign):
        others = [v for v in range(scores.shape[0]) if v != i]
        total = total - (codes[a][None] * log_p[others]).sum(-1).mean()  # mean over (V − 1, B)
    return total / len(crops_for_assign)


# Official multi-crop augmentations [1] (src/multicropdataset.py): colour distortion of strength 1
# (jitter 0.8, 0.8, 0.8, 0.2 with p=0.8), grayscale p=0.2, Gaussian blur p=0.5 with σ in [0.1, 2].
_PAPER_COLOUR = dict(jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2,
                     blur_p=0.5, blur_sigma=(0.1, 2.0))


@dataclass
class SwAVConfig(MethodConfig):
    n_prototypes: int = 3000  # K ([0] A.1: 3000 for ImageNet)
    temperature: float = 0.1  # tau of the swapped prediction ([0] A.1)
    epsilon: float = 0.05  # entropic regularisation of Sinkhorn–Knopp ([0] A.1)
    sinkhorn_iterations: int = 3  # [0] A.1
    crops_for_assign: tuple[int, ...] = (0, 1)  # crops whose codes are predicted: the two global crops
    proj_hidden_dim: int = 2048  # [1] hidden_mlp
    proj_dim: int = 128  # [1] feat_dim: the dimension of z and of the prototypes
    proj_layers: int = 2  # Linear–BN–ReLU–Linear ([1] src/resnet50.py)
    freeze_prototypes_epochs: float = 1.0  # [0] A.1 "first epoch" ([1]: 313 iterations at batch 4096)
    queue_length: int = 0  # embeddings kept from previous steps; 0 = no queue ([1] default; 3840 at batch 256)
    epoch_queue_starts: int = 15  # [1]: the queue starts filling at this epoch
    n_local_views: int = 6  # [0] §3.2: 2 × 224 + 6 × 96
    views: ViewConfig = field(default_factory=lambda: ViewConfig(size=224, scale=(0.14, 1.0), **_PAPER_COLOUR))
    local_views: ViewConfig = field(default_factory=lambda: ViewConfig(size=96, scale=(0.05, 0.14),
                                                                       **_PAPER_COLOUR))

    def __post_init__(self):
        check(self.n_prototypes >= 1, "n_prototypes", "must be at least 1 (the paper uses 3000)")
        check(self.temperature > 0, "temperature", "must be positive (the paper uses 0.1)")
        check(self.epsilon > 0, "epsilon", "must be positive (the paper uses 0.05)")
        check(self.sinkhorn_iterations >= 1, "sinkhorn_iterations", "must be at least 1 (the paper uses 3)")
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")
        check(self.n_local_views >= 0, "n_local_views", "must be 0 or more (the paper uses 6)")
        n_crops = N_GLOBAL_VIEWS + self.n_local_views
        check(len(self.crops_for_assign) > 0 and len(set(self.crops_for_assign)) == len(self.crops_for_assign)
              and all(0 <= i < n_crops for i in self.crops_for_assign), "crops_for_assign",
              f"must be distinct crop indices in 0..{n_crops - 1} (the paper uses [0, 1], the global crops)")
        # a multiple of the global batch: checked at the first step, where the batch is known (SwAV._codes)
        check(self.queue_length >= 0, "queue_length", "must be 0 (no queue) or a multiple of the batch")
        check(self.epoch_queue_starts >= 0, "epoch_queue_starts", "must be 0 or more")
        check(self.freeze_prototypes_epochs >= 0, "freeze_prototypes_epochs", "must be 0 or more (the paper uses 1)")


@register_method("swav")
class SwAV(Method):
    """Outside the trainer (``steps_per_epoch`` None) the epoch schedules count as passed: the
    prototypes are not frozen and the queue (when ``queue_length > 0``) fills from the first step."""

    Config = SwAVConfig
    paper = "Caron et al. 2020, https://arxiv.org/abs/2006.09882"
    batch_coupled = True  # Sinkhorn codes balanced over the batch

    def __init__(self, backbone, cfg: SwAVConfig):
        super().__init__(backbone, cfg)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.n_prototypes, bias=False)  # C: (K, proj_dim)
        self.normalize_prototypes()
        self.augment = self.view_pipeline(cfg.views)
        self.local_augment = self.view_pipeline(cfg.local_views)
        if cfg.queue_length > 0:
            # newest first, as [1]; identical on every process (it holds gathered global batches)
            self.register_buffer("queue", torch.zeros(len(cfg.crops_for_assign), cfg.queue_length, cfg.proj_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # valid rows
        self._pending: list[torch.Tensor] = []  # (A, N, d) embeddings of this step's micro-batches, for the queue

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Each prototype (row of C) to unit L2 norm, as [1] does before every iteration."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def _epoch_step(self, epochs: float) -> int:
        return 0 if self.steps_per_epoch is None else int(round(epochs * self.steps_per_epoch))

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.normalize_prototypes()
        crops = [self.augment(batch.images, batch.rng) for _ in range(N_GLOBAL_VIEWS)]
        crops += [self.local_augment(batch.images, batch.rng) for _ in range(cfg.n_local_views)]
        h = forward_multicrop(self.backbone, crops)  # (V·B, D): one backbone call per resolution
        b, n_views = batch.images.shape[0], len(crops)
        frozen = batch.step < self._epoch_step(cfg.freeze_prototypes_epochs)
        z = F.normalize(self.projector(h).float(), dim=1)  # (V·B, proj_dim); BN over every crop, as [1]
        with torch.autocast(h.device.type, enabled=False):  # exp(s / 0.05) needs float32 scores
            c = self.prototypes.weight.float()  # (K, proj_dim)
            scores = (z @ (c.detach() if frozen else c).T).view(n_views, b, -1)  # (V, B, K)
            codes, use_queue = self._codes(scores.detach(), z.detach().view(n_views, b, -1), c.detach(), batch.step)
            loss = swapped_prediction_loss(scores, codes, cfg.crops_for_assign, cfg.temperature)
        return {
            "loss": loss,
            "z_std": z[: N_GLOBAL_VIEWS * b].detach().std(0).mean(),  # → 0 when the embeddings collapse
            "code_max": codes.max(-1).values.mean(),  # 1/K for uniform codes, 1 for hard assignments
            "queue_used": torch.tensor(float(use_queue), device=z.device),
            "prototypes_frozen": torch.tensor(float(frozen), device=z.device),
        }

    @torch.no_grad()
    def _codes(self, scores: torch.Tensor, z: torch.Tensor, c: torch.Tensor, step: int) -> tuple[torch.Tensor, bool]:
        """Sinkhorn codes ``(A, B, K)`` of the assigned crops (with the queue once it is full), then the
        queue takes this step's global batch.  ``scores (V, B, K)``, ``z (V, B, proj_dim)``, ``c (K, proj_dim)``."""
        cfg, b = self.cfg, scores.shape[1]
        n = b * D.world_size()  # the global batch (every process holds b images)
        if cfg.queue_length % n:  # checked from the first step, not only once the queue starts
            raise InputError(f"method_args.queue_length={cfg.queue_length} is not a multiple of the global batch "
                             f"of a step ({n} images): set it to a multiple of data.batch_size / train.accumulate, "
                             f"or 0 for no queue")
        queue_on = cfg.queue_length > 0 and step >= self._epoch_step(cfg.epoch_queue_starts)
        use_queue = queue_on and int(self.queue_filled) >= cfg.queue_length
        codes = []
        for a, i in enumerate(cfg.crops_for_assign):
            s = scores[i]  # (B, K)
            if use_queue:  # this process's share of the (replicated) queue, so each row counts once
                share = cfg.queue_length // D.world_size()
                mine = self.queue[a, D.rank() * share : (D.rank() + 1) * share]  # (L/P, proj_dim)
                s = torch.cat([mine @ c.T, s])  # (L/P + B, K)
            codes.append(sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iterations)[-b:])
        if queue_on and self.training:  # the queue takes them in on_step_end: one queue for every micro-batch
            self._pending.append(D.gather_nograd(z[list(cfg.crops_for_assign)].transpose(0, 1)).transpose(0, 1))
        return torch.stack(codes), use_queue

    @torch.no_grad()
    def enqueue(self, z_new: torch.Tensor) -> None:
        """FIFO: shift by ``z_new (A, n, d)``'s n rows, newest first."""
        n = z_new.shape[1]
        self.queue.copy_(torch.cat([z_new, self.queue[:, :-n]], dim=1)[:, : self.cfg.queue_length])
        self.queue_filled.add_(n).clamp_(max=self.cfg.queue_length)

    def on_step_end(self, step: int, max_steps: int) -> None:
        if self._pending:  # this step's micro-batches, newest (the last) first
            self.enqueue(torch.cat(self._pending[::-1], dim=1))
            self._pending.clear()
        self.normalize_prototypes()  # so the stored state holds unit prototypes after every step
