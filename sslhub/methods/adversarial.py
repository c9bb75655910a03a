"""Adversarial pieces for the generative pretext methods (context-encoder inpainting, SRGAN super-resolution):
a convolutional discriminator and the GAN losses, trained through the trainer's second optimiser.

- [0] Goodfellow et al. Generative Adversarial Nets. NeurIPS 2014, https://arxiv.org/abs/1406.2661 — the
  minimax game and the non-saturating generator loss ``−log D(G(z))``.
- [1] Radford, Metz, Chintala. DCGAN. ICLR 2016, https://arxiv.org/abs/1511.06434 — strided convolutions,
  batch norm, LeakyReLU(0.2) in the discriminator (the context encoder's and SRGAN's discriminators follow it).

A method with a discriminator returns two losses from ``loss()`` and names their parameters in ``optim_groups()``:
``{"loss": generator and encoder parameters, "d_loss": discriminator parameters}``.  The trainer back-propagates each
loss into its own group only (``accumulate_gradients``), so the generator's adversarial term, which passes through
the discriminator, moves the generator alone, and the discriminator's loss (on a detached fake) moves the
discriminator alone; both use the discriminator as it was before the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvDiscriminator(nn.Module):
    """DCGAN-style: ``depth`` blocks of 4×4 stride-2 convolution (+ BN after the first) + LeakyReLU(0.2), widths
    doubling from ``width``; then a convolution to one logit per image (``patch=False``, global average of the
    last map) or per location (``patch=True``: a PatchGAN map).  Input ``(B, C, H, W)`` with H, W ≥ 2^depth."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 3, patch: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, 1, 3, padding=1)
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))  # (B, 1, h, w)
        return logits if self.patch else logits.mean(dim=(1, 2, 3))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """[0]'s discriminator objective as a loss: ``−log D(x) − log(1 − D(G(z)))``, each term averaged (pass the fake
    through the discriminator *detached*, so this loss reaches the discriminator only)."""
    return (F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
            + F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32)))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """[0]'s non-saturating generator loss ``−log D(G(z))`` (strong gradients early, when D rejects the fakes)."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))
