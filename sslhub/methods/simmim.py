"""SimMIM: replace masked patches by a learned token, encode every patch, regress the hidden pixels with L1.

- [0] Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu. SimMIM: A Simple Framework for Masked Image Modeling. CVPR 2022,
  https://arxiv.org/abs/2111.09886 (official code: github.com/microsoft/SimMIM)

Unlike MAE the encoder sees the whole grid: the embedding of every hidden patch is replaced by one learned
``mask_token`` before the position embedding is added, so the encoder costs the same at any masking ratio.
Masks are drawn on a coarser grid than the patches (the paper: 32-px mask patches over 16-px ViT patches, ratio
0.6; here by default twice the encoder's patch size; §4.1.1 / Table 1: random masking with large mask patches
works best), each mask cell hiding the patches it
covers.  The prediction head is one linear layer — a 1x1 convolution from the encoder's width to ``p²·3``
followed by a pixel shuffle — and the loss is the L1 distance on the hidden pixels only (of the normalised
input; Table 3: L1 ≈ L2, hidden pixels only better than all),

    L = Σ |ŷ − x| · M / (Σ M + 1e-5) / 3,     M = the pixel mask (1 where hidden).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sslhub.config import check
from sslhub.data.augment import ViewConfig
from sslhub.errors import InputError
from sslhub.methods.mim import MaskedModeling, MaskedModelingConfig
from sslhub.methods.registry import register_method
from sslhub.models import patches as P


def simmim_loss(rec: torch.Tensor, x: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """``rec, x: (B, C, H, W)``, ``pixel_mask: (B, 1, H, W)`` 1 where hidden: L1 on hidden pixels, per channel."""
    l1 = (rec.float() - x.float()).abs()
    return (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / x.shape[1]


@dataclass
class SimMIMConfig(MaskedModelingConfig):
    mask_ratio: float = 0.6  # paper (ViT-B): 0.6
    # paper: 32-px mask cells over 16-px patches; null = twice the encoder's patch size (the paper's ratio)
    mask_patch_size: Optional[int] = None
    # paper / official config: RandomResizedCrop(scale 0.67–1, ratio 3/4–4/3) + flip, no colour augmentation
    views: ViewConfig = field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.67, 1.0), jitter_p=0.0, gray_p=0.0))

    def __post_init__(self):
        super().__post_init__()
        check(self.mask_patch_size is None or self.mask_patch_size >= 1, "mask_patch_size",
              "must be a positive number of pixels (or null: twice the patch size)")
        check(self.masking == "random", "masking", "SimMIM masks random cells of mask_patch_size (random)")


@register_method("simmim")
class SimMIM(MaskedModeling):
    Config = SimMIMConfig
    paper = "Xie et al. 2021, https://arxiv.org/abs/2111.09886"
    head_keys = ("mask_token", "decoder.")

    def __init__(self, backbone, cfg: SimMIMConfig):
        super().__init__(backbone, cfg)
        cell = cfg.mask_patch_size or 2 * self.patch
        if cell % self.patch:
            raise InputError(f"method_args.mask_patch_size={cell} is not a multiple of the encoder's "
                             f"{self.patch}-px patches")
        self.scale = cell // self.patch
        if self.grid[0] % self.scale or self.grid[1] % self.scale:
            raise InputError(f"method_args.mask_patch_size={cell} does not divide the "
                             f"{self.grid[0] * self.patch}-px image into whole mask cells")
        self.check_masking((self.grid[0] // self.scale) * (self.grid[1] // self.scale), "mask cells")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(backbone.dim, self.patch ** 2 * 3, kernel_size=1),
                                     nn.PixelShuffle(self.patch))

    def mask_at(self, n, ratio, g):
        self.check_masking((self.grid[0] // self.scale) * (self.grid[1] // self.scale), "mask cells", ratio)
        return P.coarse_mask(n, self.grid, self.scale, ratio, g)

    def predict(self, x, mask):
        tokens = P.encode_with_mask_token(self.vit, x, mask, self.mask_token)  # (B, P + L, D)
        z = tokens[:, P.n_prefix_tokens(self.vit) :]
        b, L, d = z.shape
        z = z.transpose(1, 2).reshape(b, d, *self.grid)  # (B, D, gh, gw)
        return self.decoder(z)  # (B, 3, H, W)

    def pixel_loss(self, x, mask):
        rec = self.predict(x, mask)
        loss = simmim_loss(rec, x, P.mask_to_pixels(mask, self.patch, self.grid).to(x.device))
        return loss, {"hidden": mask.float().mean()}
