"""MoCo v2: a query encoder matches its key (a momentum encoder's view) against a queue of past keys.

- [0] He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised Visual Representation Learning.
  CVPR 2020, https://arxiv.org/abs/1911.05722 (MoCo v1: queue, momentum encoder, shuffling BN)
- [1] Chen, Fan, Girshick, He. Improved Baselines with Momentum Contrastive Learning. 2020,
  https://arxiv.org/abs/2003.04297 (v2: MLP head, blur augmentation, τ = 0.2, cosine lr)

Two views of each image; the query ``q = normalize(head(backbone(x_q)))`` and the key
``k = normalize(head_k(backbone_k(x_k)))`` from the momentum (key) encoder, without gradient.  With the
queue ``{k_j}`` of the K most recent keys, InfoNCE (v1 eq. 1) per query is

    L_q = −log( exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_j exp(q·k_j/τ)) ),

averaged over the batch.  After each step ``θ_k ← m·θ_k + (1 − m)·θ_q`` (v1 eq. 2), and the keys of
the *global* batch are enqueued (FIFO, wrapping round), so every process holds the same queue; with
``train.accumulate`` the keys of all micro-batches are enqueued together, so each micro-batch sees one queue.

Shuffling BN (v1 §3.3): keys are computed by a BN that sees a random subset of the batch, so a query
and its positive key never share batch statistics (which would leak a shortcut).  The key-view images
of all processes are gathered and permuted with a generator seeded from the step (the same on every
process); the permuted batch is cut into ``bn_groups`` groups, each forwarded on its own (its own BN
statistics), the keys are gathered back and un-permuted.  Process r forwards groups
``r·G/P … (r+1)·G/P − 1``, so P processes compute exactly the keys of one process when P divides G.
The key encoder always normalises with its group's statistics and is never run in eval mode, so its
BN layers keep no running statistics (each process only sees its own groups).  The query encoder's BN
is global (statistics of the whole batch), like every other method's.

``symmetric=True`` (the CIFAR-10 demo of the official code) uses each view as a query in turn:
``L(q1, k2) + L(q2, k1)``, and enqueues both views' keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import (
    ema_update_,
    momentum_copy,
    normalized_std,
)
from sslhub.methods.registry import register_method


def infonce_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against [its positive key, the K queued keys] (v1 Algorithm 1).

    ``q, k: (B, D)`` L2-normalised, row i ↔ row i; ``queue: (K, D)`` L2-normalised negatives.
    Returns the batch-mean loss and the logits ``(B, 1 + K)`` (column 0 is the positive).
    A per-sample mean, so the mean of the per-process losses is the loss of the global batch.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.T  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits


def check_bn_groups(bn_groups: int, world: int) -> None:
    if bn_groups < 1:
        raise InputError(f"method_args.bn_groups must be a positive integer (the paper: 8), got {bn_groups}")
    if bn_groups % world:
        raise InputError(f"method_args.bn_groups={bn_groups} must be a multiple of the number of processes "
                         f"({world}): every process forwards bn_groups / processes key groups")


def shuffle_bn_forward(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bn_groups: int,
                       g: torch.Generator) -> torch.Tensor:
    """Keys of the GLOBAL batch with shuffling BN: permute, forward in ``bn_groups`` groups, un-permute.

    ``x: (B, ...)`` this process's key views; ``g`` a generator seeded identically on every process.
    Returns ``(N, D)``, N = B·processes, row i = the key of global image i (rank order), no gradient.
    """
    world = D.world_size()
    check_bn_groups(bn_groups, world)
    x_all = D.gather_nograd(x)  # (N, ...)
    n = x_all.shape[0]
    if n % bn_groups:
        raise InputError(f"the global batch of {n} images does not split into method_args.bn_groups="
                         f"{bn_groups} equal groups: pick bn_groups dividing data.batch_size")
    perm = torch.randperm(n, generator=g).to(x.device)  # position j of the shuffled batch holds image perm[j]
    per_rank = n // world
    mine = x_all[perm[D.rank() * per_rank:(D.rank() + 1) * per_rank]]  # (N/P, ...)
    k_mine = torch.cat([net(chunk) for chunk in mine.split(n // bn_groups)])  # one BN batch per group
    k_shuffled = D.gather_nograd(k_mine)  # (N, D) in shuffled order
    k = torch.empty_like(k_shuffled)
    k[perm] = k_shuffled  # un-shuffle
    return k


def check_queue_size(queue_size: int, keys_per_step: int) -> None:
    if keys_per_step > queue_size:
        raise InputError(f"method_args.queue_size={queue_size} is smaller than the {keys_per_step} keys enqueued "
                         f"per step: use a queue of at least the global batch (twice it when symmetric)")


@dataclass
class MoCoV2Config(MethodConfig):
    temperature: float = 0.2  # τ (v2 §2: 0.2 with the MLP head; v1 used 0.07)
    queue_size: int = 65536  # K negatives (v1 §4.1: 65536)
    momentum: float = 0.999  # m of the key encoder (v1 §3.2/§4.1: 0.999)
    proj_hidden_dim: int = 2048  # head: fc(2048) → ReLU → fc(128), no BN (v2 §2, ResNet-50 width)
    proj_dim: int = 128  # key / query dimension (v1, v2: 128)
    bn_groups: int = 8  # shuffling-BN groups: v1 §3.3 shuffles over 8 GPUs, i.e. 8 BN groups
    symmetric: bool = False  # paper: asymmetric (view 1 queries, view 2 keys)
    # v2's "aug+" (official code, main_moco.py --aug-plus), ImageNet 224 px: crop 0.2–1, flip, jitter p 0.8
    # (0.4, 0.4, 0.4, 0.1), grayscale 0.2, blur p 0.5 with σ ∈ [0.1, 2].  Both views alike.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
        gray_p=0.2, blur_p=0.5))

    def __post_init__(self):
        check(self.temperature > 0, "temperature", "must be > 0 (the paper: 0.2)")
        check(0 <= self.momentum <= 1, "momentum", "must be in [0, 1] (the paper: 0.999)")
        for name in ("queue_size", "proj_hidden_dim", "proj_dim"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")
        check(self.bn_groups >= 1, "bn_groups", "must be a positive integer (the paper: 8)")


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """v2's head: Linear → ReLU → Linear, without BN (so not ``projection_mlp``, whose hidden layer has BN)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@register_method("moco_v2")
class MoCoV2(Method):
    Config = MoCoV2Config
    paper = "Chen et al. 2020, https://arxiv.org/abs/2003.04297"

    def __init__(self, backbone, cfg: MoCoV2Config):
        super().__init__(backbone, cfg)
        self.projector = mlp_head(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.key_backbone = momentum_copy(self.backbone)  # θ_k: in state_dict, never optimised
        self.key_projector = momentum_copy(self.projector)
        for m in [*self.key_backbone.modules(), *self.key_projector.modules()]:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False  # always per-group batch statistics (see the module docstring)
        # v1's queue starts as random unit vectors and fills with keys after K / N steps.
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))  # (K, D)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # next row to overwrite
        self._pending_keys: list[torch.Tensor] = []  # keys of this step's micro-batches, enqueued in on_step_end
        self.augment = self.view_pipeline(cfg.views)

    def configure(self, steps_per_epoch: int, max_steps: int) -> None:
        super().configure(steps_per_epoch, max_steps)
        check_bn_groups(self.cfg.bn_groups, D.world_size())  # needs the number of processes

    def convert_batchnorm(self) -> None:
        """Global BN for the query encoder; the key encoder keeps local BN (its groups are the point)."""
        for name, child in self.named_children():
            if name not in ("key_backbone", "key_projector"):
                setattr(self, name, D.convert_batchnorm(child))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)  # (B, D)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Keys of the global batch ``(N, D)`` through the key encoder, with shuffling BN."""

        def key_encoder(v):
            return self.key_projector(self.key_backbone(v))

        return F.normalize(shuffle_bn_forward(key_encoder, x, self.cfg.bn_groups, g).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys (n, D)`` at the pointer, wrapping round the end of the queue; advance the pointer."""
        size = self.queue.shape[0]
        check_queue_size(size, keys.shape[0])
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x1 = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment(batch.images, batch.rng)
        b = x1.shape[0]
        check_queue_size(cfg.queue_size, b * D.world_size() * (2 if cfg.symmetric else 1))  # before any work
        g = torch.Generator().manual_seed(batch.step)  # the shuffle: the same permutation on every process
        own = slice(D.rank() * b, (D.rank() + 1) * b)  # this process's rows of the global batch
        queue = self.queue  # negatives of this step; the queue changes only in on_step_end
        q1 = self.query(x1)
        k2 = self.keys(x2, g)  # (N, D)
        loss, logits = infonce_queue(q1, k2[own], queue, cfg.temperature)
        new_keys = k2
        if cfg.symmetric:
            q2 = self.query(x2)
            k1 = self.keys(x1, g)
            loss_21, logits_21 = infonce_queue(q2, k1[own], queue, cfg.temperature)
            loss = loss + loss_21
            logits = torch.cat([logits, logits_21])
            new_keys = torch.cat([k1, k2])
        if self.training:  # enqueued after the optimiser step, so every micro-batch of a step sees one queue
            self._pending_keys.append(new_keys)
        return {"loss": loss,
                "acc": (logits.detach().argmax(dim=1) == 0).float().mean(),  # positive ranked first among 1 + K
                "z_std": normalized_std(q1)}  # ~1/√proj_dim healthy, 0 when collapsed

    def on_step_end(self, step: int, max_steps: int) -> None:
        if self._pending_keys:  # the keys of every micro-batch of this step, in order
            self.enqueue(torch.cat(self._pending_keys))
            self._pending_keys.clear()
        ema_update_(self.key_backbone, self.backbone, self.cfg.momentum)
        ema_update_(self.key_projector, self.projector, self.cfg.momentum)
