"""The encoder section of a recipe and of an export's config, kept free of torch and timm so a recipe is
checked (and its errors reported) before any heavy import."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sslhub import formats
from sslhub.config import check


@dataclass
class EncoderConfig:
    arch: str = "resnet18"  # any timm architecture name
    cifar_stem: bool = False  # ResNets: 3x3 stride-1 first conv, no max-pool (for 32-px images)
    image_size: int = 224  # input size the encoder is trained and served at
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (e.g. patch_size)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        check(self.image_size >= 1, "image_size", "the input side in pixels must be a positive integer")
        check(all(s > 0 for s in self.std), "std", "every channel's std must be > 0")
        bad = sorted(k for k in self.model_args if k in formats.WEIGHT_SOURCE_ARGS)
        check(not bad, "model_args", f"sets {', '.join(bad)}: weights a recipe trains from are not loaded through "
              "timm (a checkpoint_path would be unpickled); remove it")
