"""What every masked-image-modeling method shares: masks, reconstructions, their pictures and their export.

A :class:`MaskedModeling` method (MAE, SimMIM) hides patches of a timm ViT's grid and predicts their pixels.
Subclasses implement ``predict(x, mask) → (B, 3, H, W)`` (the reconstruction in the normalised pixel space of the
input) and ``pixel_loss(x, mask) → (loss, extras)``; this base draws the masks, makes the one augmented view,
evaluates the masked reconstruction error on held-out images, draws the reconstruction grid and exports the
encoder as the plain timm ViT plus the reconstruction head in its own file:

    export/
      model.safetensors       the encoder alone (plain timm: timm.create_model("local-dir:export") loads it)
      config.json             timm's layout; config["sslhub"]["masked_modeling"] says how to rebuild the head
      mim_head.safetensors    decoder / prediction head and mask token (read only by sslhub's reconstruct view)
      reconstructions.png     original | masked input | reconstruction | reconstruction + visible patches
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import save

from sslhub import formats
from sslhub.config import check, from_dict, to_dict
from sslhub.data.augment import ViewConfig, eval_transform
from sslhub.errors import InputError
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.methods.registry import get_method
from sslhub.models import patches as P
from sslhub.models.encoder_config import EncoderConfig
from sslhub.publish.export import Evaluate, Files, export_encoder
from sslhub.publish.pictures import image_grid

MIM_HEAD = "mim_head.safetensors"
PICTURE = "reconstructions.png"


@dataclass
class MaskedModelingConfig(MethodConfig):
    mask_ratio: float = 0.75
    masking: Literal["random", "block"] = "random"  # block: BEiT's block-wise masking (MAE Table 1(f))
    views: ViewConfig = dataclasses.field(default_factory=lambda: ViewConfig(
        size=224, scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0))

    def __post_init__(self):
        check(0 < self.mask_ratio < 1, "mask_ratio", "the share of hidden patches must be in (0, 1) (MAE: 0.75, "
              "SimMIM: 0.6)")


class MaskedModeling(Method):
    """Base of the masked-image-modeling methods; see the module docstring."""

    needs_vit = True
    head_keys: ClassVar[tuple[str, ...]] = ()  # state-dict prefixes of the reconstruction head (exported aside)

    def __init__(self, backbone, cfg: MaskedModelingConfig):
        super().__init__(backbone, cfg)
        P.vit_of(backbone, self.name or type(self).__name__)  # a clear error for a non-ViT encoder
        self.patch = P.patch_size(self.vit)
        self.grid = P.grid_size(self.vit)
        self.n_patches = self.grid[0] * self.grid[1]
        self.check_masking(self.n_patches, "patches")
        self.augment = self.view_pipeline(cfg.views)

    def check_masking(self, units: int, what: str, ratio: float | None = None) -> None:
        """A mask must hide something and leave something: ``round(ratio · units)`` in [1, units − 1] (``ratio``:
        the config's ``mask_ratio`` unless given)."""
        if ratio is not None:
            n = P.n_hidden(units, ratio) if 0 < ratio < 1 else None  # also refuses NaN
            if n is None or not 1 <= n < units:
                hides = "is not in (0, 1)" if n is None else f"hides {n} of the {units} {what}"
                raise InputError(f"{self.name}: a masking ratio of {ratio} {hides}; a mask must hide at least one "
                                 f"and leave one visible (a ratio from {1 / units:.3g} to {1 - 1 / units:.3g})")
            return
        n = P.n_hidden(units, self.cfg.mask_ratio)
        if not 1 <= n < units:
            raise InputError(f"{self.name}: method_args.mask_ratio={self.cfg.mask_ratio} of {units} {what} hides {n}; "
                             "a mask must hide at least one and leave one visible (raise the image size or the ratio, "
                             "or use smaller patches)")

    @property
    def vit(self):
        """The encoder's timm ViT (a property: registered once, under ``backbone.model``)."""
        return self.backbone.model

    # -------------------------------------------------------------- masks
    def draw_mask(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``(n, L)`` bool masks (True = hidden) for ``n`` samples."""
        return self.mask_at(n, self.cfg.mask_ratio, g)

    def mask_at(self, n: int, ratio: float, g: torch.Generator) -> torch.Tensor:
        """Masks drawn as ``draw_mask`` draws them but hiding the share ``ratio`` (the demo's slider); ``InputError``
        for a ratio that hides nothing or everything."""
        self.check_masking(self.n_patches, "patches", ratio)
        if self.cfg.masking == "block":
            return P.block_mask(n, self.grid, ratio, g)
        return P.random_mask(n, self.n_patches, ratio, g)

    def mask_for(self, batch: Batch) -> torch.Tensor:
        """The masks of ``batch``: rows ``offset … offset + B`` of the masks drawn from the step's shared seed, so
        an image's mask depends on its place in the step's global batch, not on how the step is split over
        processes or micro-batches (``Batch.seed``)."""
        g = torch.Generator().manual_seed(batch.sample_seed())
        start, n = batch.sample_offset(), batch.images.shape[0]
        return self.draw_mask(start + n, g)[start:].to(batch.images.device)

    # -------------------------------------------------------------- what subclasses provide
    def pixel_loss(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``(B, 3, H, W)`` in the normalised pixel space of ``x`` (every pixel predicted)."""
        raise NotImplementedError

    # -------------------------------------------------------------- training
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        mask = self.mask_for(batch)  # first: the default seed is drawn from batch.rng
        x = self.augment(batch.images, batch.rng)  # (B, 3, S, S) normalised
        loss, extras = self.pixel_loss(x, mask)
        return {"loss": loss, **extras}

    # -------------------------------------------------------------- evaluation and pictures
    def eval_images(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.backbone.cfg
        return eval_transform(images, cfg.image_size, cfg.mean, cfg.std)

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
                 seed: int = 0) -> dict[str, float]:
        """Held-out masked reconstruction error: the mean squared error, in normalised pixels, over the hidden
        pixels of each test image (masks from ``seed``: the same for every checkpoint)."""
        g = torch.Generator().manual_seed(seed)
        device = next(self.parameters()).device
        total = count = 0.0
        for i in range(0, images.shape[0], batch_size):
            x = self.eval_images(images[i : i + batch_size].to(device))
            mask = self.draw_mask(x.shape[0], g).to(device)
            rec = self.predict(x, mask).float()
            px = P.mask_to_pixels(mask, self.patch, self.grid)  # (B, 1, H, W)
            total += float((((rec - x.float()) ** 2) * px).sum()) / x.shape[1]
            count += float(px.sum())
        return {"masked_mse": total / max(count, 1.0)}

    @torch.no_grad()
    def reconstruction_panels(self, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Four ``(B, 3, H, W)`` uint8 panels: original, masked input (hidden patches grey), reconstruction, and the
        reconstruction with the visible patches pasted back."""
        device = next(self.parameters()).device
        cfg = self.backbone.cfg
        x = self.eval_images(images.to(device))
        mask = mask.to(device)
        rec = self.predict(x, mask).float()
        mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)

        def to_uint8(t: torch.Tensor) -> torch.Tensor:
            return ((t * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

        px = P.mask_to_pixels(mask, self.patch, self.grid)
        grey = (0.5 - mean) / std
        return [to_uint8(x), to_uint8(x * (1 - px) + grey * px), to_uint8(rec), to_uint8(x * (1 - px) + rec * px)]

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, what: str = "held-out images", seed: int = 0) -> dict[str, tuple[bytes, str]]:
        """The reconstruction grid of ``images`` (fixed images, ``what`` they are; masks from ``seed``) as PNG bytes."""
        if images.shape[0] == 0:
            return {}
        mask = self.draw_mask(images.shape[0], torch.Generator().manual_seed(seed))
        panels = self.reconstruction_panels(images, mask)
        png = image_grid(panels, ["original", f"masked {self.cfg.mask_ratio:.0%}", "reconstruction",
                                  "recon. + visible"])
        caption = (f"{self.name} reconstructions of {what} ({self.cfg.mask_ratio:.0%} of the patches hidden, "
                   f"{self.cfg.masking} masking{self.picture_note()})")
        return {PICTURE: (png, caption)}

    def picture_note(self) -> str:
        """What a reader of the pictures must know about how the reconstruction is shown ("" or ", …")."""
        return ""

    # -------------------------------------------------------------- export
    def head_state(self) -> dict[str, torch.Tensor]:
        """The reconstruction head's tensors (everything that is not the encoder), for ``mim_head.safetensors``."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if k.startswith(self.head_keys)}

    def export(self, folder: str | Path, info: dict[str, Any], evaluate: Evaluate | None = None,
               files: Files | None = None) -> Path:
        head = save(self.head_state(), metadata={"format": "pt"})
        info = {**info, "masked_modeling": {"method": self.name, "method_args": to_dict(self.cfg), "head": MIM_HEAD}}
        return export_encoder(self.exported_backbone(), folder, info, evaluate=evaluate,
                              files={**(files or {}), MIM_HEAD: (head, "")})


def masked_modeling_section(folder: str | Path) -> dict | None:
    """``config.json``'s ``sslhub.masked_modeling`` of a masked-modeling export whose head file is there, else None
    (no config, unreadable JSON, another kind of export)."""
    folder = Path(folder)
    try:
        section = json.loads((folder / formats.CONFIG).read_text()).get(formats.SSLHUB_SECTION)
    except (OSError, ValueError, AttributeError):
        return None
    mm = section.get("masked_modeling") if isinstance(section, dict) else None
    if not isinstance(mm, dict) or not (folder / str(mm.get("head", MIM_HEAD))).is_file():
        return None
    return mm


def load_masked_model(folder: str | Path, device: str | torch.device = "cpu") -> MaskedModeling:
    """A masked-modeling export (encoder + ``mim_head.safetensors``) rebuilt as its method, in eval mode, for
    reconstructions (the demo's reconstruct view).  Safetensors only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    mm = masked_modeling_section(folder)
    if mm is None:
        raise InputError(f"{folder}: not a masked-modeling export (needs config.json's sslhub.masked_modeling and "
                         f"{MIM_HEAD}; train one with recipes/mae_imagenette.yaml or simmim_imagenette.yaml)")
    where = str(folder / formats.CONFIG)
    s = json.loads((folder / formats.CONFIG).read_text())[formats.SSLHUB_SECTION]
    enc = from_dict(EncoderConfig, s["encoder"], where, prefix="sslhub.encoder.")
    cls = get_method(mm["method"])
    method = cls.create(enc, from_dict(cls.Config, mm["method_args"], where, prefix="sslhub.masked_modeling.method_args."))
    method.backbone.model.load_state_dict(load_file(str(folder / formats.WEIGHTS)))
    missing, unexpected = method.load_state_dict(load_file(str(folder / mm.get("head", MIM_HEAD))), strict=False)
    bad = [k for k in missing if k.startswith(cls.head_keys)] + list(unexpected)
    if bad:
        raise InputError(f"{folder / MIM_HEAD}: does not match {mm['method']}'s head ({', '.join(bad[:4])} …)")
    return method.to(device).eval()
