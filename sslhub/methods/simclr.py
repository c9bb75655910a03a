"""SimCLR: two augmented views, a projection head and the NT-Xent contrastive loss.

- [0] Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of Visual
  Representations. ICML 2020, https://arxiv.org/abs/2002.05709

Each image gives two views; ``z = normalize(projector(backbone(view)))``.  For each of the 2N
embeddings the other view of the same image is the positive and the remaining 2N - 2 are negatives
(N = the *global* batch: embeddings are gathered from every process, with gradients).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import sslhub.distributed as D
from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.common import projection_mlp
from sslhub.methods.registry import register_method


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the global batch.  ``z1, z2: (B, D)`` local, L2-normalised, row i ↔ row i.

    Each process scores its own 2B anchors against all 2N gathered embeddings, so the mean of the
    per-process losses is the single-process loss at batch N (and so are the averaged gradients).
    """
    b = z1.shape[0]
    z1_all, z2_all = D.gather(z1), D.gather(z2)  # (N, D) each
    n = z1_all.shape[0]
    anchors = torch.cat([z1, z2]).float()  # (2B, D)
    candidates = torch.cat([z1_all, z2_all]).float()  # (2N, D)
    logits = anchors @ candidates.T / temperature  # (2B, 2N)
    own = D.rank() * b + torch.arange(b, device=z1.device)  # global row of each local sample
    self_idx = torch.cat([own, own + n])  # where each anchor sits among the candidates
    pos_idx = torch.cat([own + n, own])  # its other view
    rows = torch.arange(2 * b, device=z1.device)
    logits[rows, self_idx] = float("-inf")  # an embedding is never its own negative
    return F.cross_entropy(logits, pos_idx)


@dataclass
class SimCLRConfig(MethodConfig):
    temperature: float = 0.5  # tau; 0.5 is the paper's CIFAR-10 value (0.1 for ImageNet at batch 4096)
    proj_hidden_dim: int = 2048  # hidden width of g(·) (paper: the encoder width, 2048 for ResNet-50)
    proj_dim: int = 128  # output dimension of g(·)
    proj_layers: int = 2  # paper: 2-layer MLP
    # Paper appendix B.9, CIFAR-10: crops 0.08–1, colour jitter strength 0.5, no blur.
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=32, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
        gray_p=0.2, blur_p=0.0))

    def __post_init__(self):
        check(self.temperature > 0, "temperature", "must be > 0 (the paper: 0.5 for CIFAR-10, 0.1 for ImageNet)")
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")


@register_method("simclr")
class SimCLR(Method):
    Config = SimCLRConfig
    paper = "Chen et al. 2020, https://arxiv.org/abs/2002.05709"
    batch_coupled = True  # in-batch negatives

    def __init__(self, backbone, cfg: SimCLRConfig):
        super().__init__(backbone, cfg)
        self.projector = projection_mlp(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers)
        self.augment = self.view_pipeline(cfg.views)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x1 = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        x2 = self.augment(batch.images, batch.rng)
        h = self.backbone(torch.cat([x1, x2]))  # (2B, D): one forward for both views
        z = F.normalize(self.projector(h).float(), dim=1)  # (2B, proj_dim)
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return {"loss": loss}
