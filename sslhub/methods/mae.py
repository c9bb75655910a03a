"""MAE: hide most patches of an image, encode the visible ones, reconstruct the hidden pixels.

- [0] He, Chen, Xie, Li, Dollár, Girshick. Masked Autoencoders Are Scalable Vision Learners. CVPR 2022,
  https://arxiv.org/abs/2111.06377 (official code: github.com/facebookresearch/mae)

Per image, ``n = round(r·L)`` of its ``L`` patches are hidden (r = 0.75; per-sample random masking by sorting
noise, or BEiT's block masking for the ablation).  The encoder — the timm ViT that gets exported — sees only the
``L − n`` visible patches (+ the class token), so its cost falls with r.  A light decoder embeds the encoder's
tokens to its own width, puts a shared learned **mask token** at every hidden position, adds **fixed 2-D sin-cos
positions**, runs a few narrow Transformer blocks and predicts every patch's ``p·p·3`` pixels.  The loss is the
mean squared error on the hidden patches only,

    L = Σ_i Σ_{j hidden} ‖ŷ_ij − t_ij‖² / (p²·3) / Σ_i n,

with ``t_ij`` the patch's pixels (of the normalised input), or with ``norm_pix_loss`` (the paper's default, better
representations, Table 1(d)) the patch normalised by its own mean and (unbiased) variance,
``t = (t − mean) / √(var + 1e-6)``.

As in the official code the encoder's position embedding is the same fixed 2-D sin-cos table (frozen: timm's
``pos_embed`` keeps the values, so the export is the plain timm model) and linear layers get Xavier-uniform
initialisation.  The decoder is not part of the exported encoder; it is saved beside it
(``mim_head.safetensors``) for the demo's reconstruct view.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from sslhub.config import check
from sslhub.methods.mim import MaskedModeling, MaskedModelingConfig
from sslhub.methods.registry import register_method
from sslhub.models import patches as P


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """``pred, target: (B, L, p·p·3)``, ``mask: (B, L)`` True = hidden; the mean per-patch MSE over hidden patches."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    m = mask.float()
    return (per_patch * m).sum() / m.sum()


class MAEDecoder(nn.Module):
    """Encoder tokens ``(B, P + K, D)`` + the mask → predicted pixels of every patch ``(B, L, p·p·3)``."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], patch: int,
                 n_prefix: int, mlp_ratio: float = 4.0, channels: int = 3):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.n_prefix = n_prefix
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", P.sincos_pos_embed_2d(dim, grid, n_prefix)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch * patch * channels)
        P.mae_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        prefix, visible = x[:, : self.n_prefix], x[:, self.n_prefix :]
        b, L = mask.shape
        idx = P.keep_indices(mask)[..., None].expand(-1, -1, x.shape[-1])
        full = torch.zeros(b, L, x.shape[-1], dtype=x.dtype, device=x.device).scatter(1, idx, visible)
        full = torch.where(mask[..., None], self.mask_token.to(x.dtype), full)  # un-shuffled: grid order
        x = torch.cat([prefix, full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.n_prefix :])


@dataclass
class MAEConfig(MaskedModelingConfig):
    # views: the paper's minimal augmentation, RandomResizedCrop(scale 0.2–1) + flip (MaskedModelingConfig)
    mask_ratio: float = 0.75  # paper: 0.75 (Table 1(e))
    norm_pix_loss: bool = True  # paper's default target: per-patch normalised pixels (Table 1(d))
    decoder_dim: int = 512  # paper: 512-d, 8 blocks, 16 heads (Table 1(a, b))
    decoder_depth: int = 8
    decoder_heads: int = 16
    fixed_pos_embed: bool = True  # official code: the encoder's position embedding is fixed 2-D sin-cos
    mae_init: bool = True  # official code: Xavier-uniform linear layers, N(0, 0.02) class/mask tokens

    def __post_init__(self):
        super().__post_init__()
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            check(getattr(self, name) >= 1, name, "must be a positive integer")
        check(self.decoder_dim % self.decoder_heads == 0, "decoder_dim", "must be divisible by decoder_heads")
        check(self.decoder_dim % 4 == 0, "decoder_dim", "must be divisible by 4 (2-D sin-cos positions)")


@register_method("mae")
class MAE(MaskedModeling):
    Config = MAEConfig
    paper = "He et al. 2021, https://arxiv.org/abs/2111.06377"
    head_keys = ("decoder.",)

    def __init__(self, backbone, cfg: MAEConfig):
        super().__init__(backbone, cfg)
        vit = self.vit
        if cfg.mae_init:
            P.mae_init_(vit)
            for tok in (vit.cls_token, getattr(vit, "reg_token", None)):
                if tok is not None:
                    nn.init.normal_(tok, std=0.02)
        if cfg.fixed_pos_embed:
            P.fix_pos_embed(vit)
        self.decoder = MAEDecoder(backbone.dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, self.grid,
                                  self.patch, P.n_prefix_tokens(vit))

    def forward_pixels(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted patches ``(B, L, p·p·3)`` (normalised per patch when ``norm_pix_loss``)."""
        latent = P.encode_visible(self.vit, x, mask)  # (B, P + K, D): visible patches only
        return self.decoder(latent, mask)

    def pixel_loss(self, x, mask):
        pred = self.forward_pixels(x, mask)
        loss = mae_loss(pred, P.patchify(x, self.patch), mask, self.cfg.norm_pix_loss)
        return loss, {"hidden": mask.float().mean()}

    def picture_note(self):
        if not self.cfg.norm_pix_loss:
            return ""
        return ("; the target is each patch normalised by its own mean and std, so the reconstruction is shown with "
                "the true patches' mean and std: the model predicts the structure within each patch, not its colour")

    def predict(self, x, mask):
        """Pixels of every patch; with ``norm_pix_loss`` the prediction is in units of each patch's own statistics,
        so it is shown with the true patch's mean and std (as the official visualisation does)."""
        pred = self.forward_pixels(x, mask).float()
        if self.cfg.norm_pix_loss:
            t = P.patchify(x, self.patch).float()
            pred = pred * (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        return P.unpatchify(pred, self.patch, self.grid)
