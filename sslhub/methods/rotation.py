"""Rotation prediction (RotNet): classify which of 0°, 90°, 180°, 270° an image was rotated by.

- [0] Gidaris, Singh, Komodakis. Unsupervised Representation Learning by Predicting Image
  Rotations. ICLR 2018, https://arxiv.org/abs/1803.07728

As in the paper (§3, "feeding all four rotated copies simultaneously"), every image of the batch
appears four times, once per rotation, so a batch of B images is a 4B-way classification batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sslhub.config import check
from sslhub.data.augment import ViewConfig, eval_transform, rotate90
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.registry import register_method

NUM_ROTATIONS = 4  # 0°, 90°, 180°, 270°


def rotate_all(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, H, W)`` → the four rotations ``(4B, C, H, W)`` and their labels ``(4B,)``.

    Row ``k * B + i`` is image i rotated by ``k * 90°`` counter-clockwise.
    """
    b = x.shape[0]
    k = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(b)  # (4B,)
    return rotate90(x.repeat(NUM_ROTATIONS, 1, 1, 1), k), k


@dataclass
class RotationConfig(MethodConfig):
    head_hidden_dim: int = 512  # 0 → a linear classifier on the pooled features
    # The paper trains CIFAR RotNets with random crops + flips only (no colour jitter).
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=32, scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, hflip_p=0.5))

    def __post_init__(self):
        check(self.head_hidden_dim >= 0, "head_hidden_dim", "must be >= 0 (0 = a linear classifier)")


@register_method("rotation")
class Rotation(Method):
    Config = RotationConfig
    paper = "Gidaris et al. 2018, https://arxiv.org/abs/1803.07728"

    def __init__(self, backbone, cfg: RotationConfig):
        super().__init__(backbone, cfg)
        d = backbone.dim
        if cfg.head_hidden_dim > 0:
            self.head = nn.Sequential(nn.Linear(d, cfg.head_hidden_dim, bias=False), nn.BatchNorm1d(cfg.head_hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(cfg.head_hidden_dim, NUM_ROTATIONS))
        else:
            self.head = nn.Linear(d, NUM_ROTATIONS)
        self.augment = self.view_pipeline(cfg.views)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S)
        x, k = rotate_all(x)  # (4B, 3, S, S), (4B,)
        logits = self.head(self.backbone(x)).float()  # (4B, 4)
        loss = F.cross_entropy(logits, k)
        acc = (logits.argmax(1) == k).float().mean()
        return {"loss": loss, "rot_acc": acc.detach()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
        """Pretext accuracy: the share of the 4 rotations of each test image predicted right."""
        cfg = self.backbone.cfg
        correct = total = 0
        for i in range(0, images.shape[0], batch_size):
            x = eval_transform(images[i : i + batch_size], cfg.image_size, cfg.mean, cfg.std)
            x, k = rotate_all(x)
            pred = self.head(self.backbone(x)).argmax(1)
            correct += (pred == k).sum().item()
            total += k.numel()
        return {"rotation_acc": correct / max(total, 1)}
