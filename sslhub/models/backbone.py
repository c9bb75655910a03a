"""The trainable image backbone: a timm model with its head removed, plus its preprocessing.

``Backbone(cfg)`` wraps ``timm.create_model(cfg.arch, num_classes=0, **cfg.model_args)`` so every
method sees the same thing: ``h = backbone(x)`` with ``x: (B, 3, S, S)`` normalised images and
``h: (B, backbone.dim)`` pooled features.  ResNets get an optional CIFAR stem (3x3 stride-1 first
convolution, no max-pool; He et al. 2016 §4.2, the stem every CIFAR SSL benchmark uses).  That stem
is registered in timm as ``<arch>_cifar`` so an export stays loadable by plain ``timm.create_model``
once ``sslhub`` is imported.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from sslhub.config import to_dict
from sslhub.errors import InputError
from sslhub.models.encoder_config import EncoderConfig

__all__ = ["Backbone", "EncoderConfig"]




CIFAR_SUFFIX = "_cifar"
# CIFAR-stem variants registered with timm at import (others are registered on first use).
COMMON_CIFAR_ARCHS = ("resnet18", "resnet34", "resnet50")


def _cifar_builder(base: str):
    def build(**kwargs: Any) -> nn.Module:
        model = timm.create_model(base, pretrained=False, **kwargs)
        if not hasattr(model, "conv1") or not hasattr(model, "maxpool"):
            raise InputError(f"cifar_stem needs a timm ResNet (conv1 + maxpool); {base!r} has no such stem")
        out_ch = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else 64
        model.conv1 = nn.Conv2d(model.conv1.in_channels if isinstance(model.conv1, nn.Conv2d) else 3,
                                out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return build


def cifar_variant(base: str) -> str:
    """Register (once) and return the timm name of ``base`` with a CIFAR stem: ``resnet18_cifar``."""
    name = base + CIFAR_SUFFIX
    if timm.is_model(name):
        return name
    if not timm.is_model(base):
        raise InputError(f"unknown timm architecture {base!r} (see timm.list_models())")

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        cfg = kwargs.pop("pretrained_cfg", None) or {"architecture": name}
        kwargs.pop("pretrained_cfg_overlay", None)
        return build_model_with_cfg(_cifar_builder(base), name, pretrained, pretrained_cfg=cfg, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)
    return name


def timm_arch(cfg: EncoderConfig) -> str:
    """The timm architecture name an encoder config builds (with the CIFAR suffix if asked)."""
    if cfg.cifar_stem:
        if cfg.arch.endswith(CIFAR_SUFFIX):
            return cifar_variant(cfg.arch[: -len(CIFAR_SUFFIX)])
        return cifar_variant(cfg.arch)
    if not timm.is_model(cfg.arch):
        if cfg.arch.endswith(CIFAR_SUFFIX):
            return cifar_variant(cfg.arch[: -len(CIFAR_SUFFIX)])
        raise InputError(f"encoder.arch: unknown timm architecture {cfg.arch!r}; try e.g. resnet18, vit_tiny_patch16_224")
    return cfg.arch


class Backbone(nn.Module):
    """``h = backbone(x)``: ``(B, 3, S, S)`` normalised images → ``(B, dim)`` pooled features."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.arch = timm_arch(cfg)
        kwargs = dict(cfg.model_args)
        if _takes_img_size(self.arch):
            kwargs.setdefault("img_size", cfg.image_size)
        self.model_args = kwargs
        self.model = timm.create_model(self.arch, pretrained=False, num_classes=0, **kwargs)
        self.dim: int = self.model.num_features
        self.channels_last = False  # the trainer sets it with train.channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)  # (B, dim)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: ``(B, C, h, w)`` for CNNs, ``(B, 1 + N, C)`` for ViTs."""
        return self.model.forward_features(x)

    def timm_config(self) -> dict:
        """config.json in timm's Hub layout (``timm.create_model('local-dir:...')`` reads it)."""
        s = self.cfg.image_size
        return {
            "architecture": self.arch,
            "num_classes": 0,
            "num_features": self.dim,
            "global_pool": getattr(self.model, "global_pool", None) and _pool_name(self.model),
            "model_args": {"num_classes": 0, **self.model_args},
            "pretrained_cfg": {
                "input_size": [3, s, s],
                "fixed_input_size": "img_size" in self.model_args,
                "interpolation": "bilinear",
                "crop_pct": 1.0,
                "crop_mode": "center",
                "mean": list(self.cfg.mean),
                "std": list(self.cfg.std),
                "num_classes": 0,
            },
            "sslhub": {"encoder": to_dict(self.cfg)},
        }


def _pool_name(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", "")
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg")


def _takes_img_size(arch: str) -> bool:
    """ViT-like timm models are built for a fixed input size and take ``img_size``."""
    return arch.split("_")[0] in ("vit", "deit", "deit3", "eva02", "beit", "beitv2", "cait", "xcit")


for _arch in COMMON_CIFAR_ARCHS:
    cifar_variant(_arch)
del _arch
