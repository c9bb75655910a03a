"""The demo's Reconstruct tab, without the page: a masked-modeling export (MAE, SimMIM) hides a share of an
uploaded image's patches and paints them back (``Reconstructor``).

A model is reconstructable when the demo is given its export folder and ``config.json`` has
``sslhub.masked_modeling`` with the head file beside it (``mim_head.safetensors``); the method is rebuilt with
``sslhub.methods.mim.load_masked_model``. The upload is cut to the region the encoder sees (as the attention
tab shows it), resized to the model's input size, masked with the method's own masking at the chosen ratio
(``MaskedModeling.mask_at``) and a seed, and shown as one PNG: original | masked | reconstruction |
reconstruction + visible patches. Bad input raises ``gr.Error`` (``user_errors``), as every endpoint does.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from sslhub.apps.demo_backend import log, read_upload, user_errors
from sslhub.errors import SslhubError
from sslhub.inference.attention import input_region
from sslhub.inference.loaders.base import Encoder
from sslhub.methods.mim import (
    MaskedModeling,
    load_masked_model,
    masked_modeling_section,
)
from sslhub.publish.pictures import image_grid

MIN_RATIO, MAX_RATIO = 0.1, 0.95  # the slider's range (widened to hold the checkpoint's own ratio)
MAX_SEED = 2**32 - 1
DISPLAY_SIDE = 224  # panels smaller than this are enlarged by a whole factor (the patch grid stays sharp)
TITLES = ["original", "masked", "reconstruction", "recon. + visible"]
NO_HEAD = ("this checkpoint has no reconstruction head (a masked-modeling export — `sslhub train` with an MAE "
           "or SimMIM recipe — has one: `mim_head.safetensors` beside the encoder).")


def masked_modeling_folder(model: str | Path | Encoder) -> Path | None:
    """The export folder ``model`` names (a path, ``local-dir:PATH``, or an ``Encoder`` loaded from one) when it
    is a masked-modeling export: ``config.json`` with ``sslhub.masked_modeling`` and its head file."""
    text = model.name if isinstance(model, Encoder) else str(model)
    folder = Path(text.removeprefix("local-dir:")) if text else None
    return folder if folder is not None and masked_modeling_section(folder) is not None else None


class Reconstructor:
    """The Reconstruct tab's endpoint; ``unavailable`` says why when the model cannot reconstruct."""

    def __init__(self, method: MaskedModeling | None, encoder: Encoder, unavailable: str | None = None):
        self.method, self.encoder = method, encoder
        self.unavailable = None if method is not None else (unavailable or NO_HEAD)

    @classmethod
    def for_model(cls, model: str | Path | Encoder, encoder: Encoder) -> Reconstructor:
        """The method rebuilt from ``model``'s folder, or an unavailable one saying why (no head, a broken head)."""
        folder = masked_modeling_folder(model)
        if folder is None:
            return cls(None, encoder, NO_HEAD)
        try:
            return cls(load_masked_model(folder, encoder.device), encoder)
        except (SslhubError, SafetensorError, OSError, ValueError, KeyError) as e:  # a damaged head: the rest serves
            log.warning("reconstruct: %s", e)
            return cls(None, encoder, f"the reconstruction head in {folder} cannot be loaded ({e}).")

    # ---------------------------------------------------------------- what the page shows
    @property
    def default_ratio(self) -> float:
        return float(self.method.cfg.mask_ratio) if self.method is not None else 0.75

    @property
    def ratio_range(self) -> tuple[float, float]:
        return min(MIN_RATIO, self.default_ratio), max(MAX_RATIO, self.default_ratio)

    @property
    def title(self) -> str:
        m = self.method
        return f"{type(m).__name__} ({m.paper})" if m is not None else ""

    @property
    def side(self) -> tuple[int, int]:
        """The model's input ``(height, width)``."""
        size = self.method.backbone.cfg.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    # ---------------------------------------------------------------- endpoint
    @user_errors("reconstruct")
    def reconstruct(self, image: dict | None, ratio: Any = None, seed: Any = None) -> tuple[Image.Image, str]:
        """Hide ``ratio`` of the patches (masks from ``seed``) and reconstruct them: the four panels as one PNG
        image, and a note with the share actually hidden (whole patches: ``hidden / total``)."""
        if self.method is None:
            raise gr.Error(f"Reconstruction is not available: {self.unavailable}")
        r = self.default_ratio if ratio is None or ratio == "" else _number(ratio, "masking ratio")
        s = 0 if seed is None or seed == "" else _number(seed, "seed")
        if s != int(s) or not 0 <= s <= MAX_SEED:
            raise gr.Error(f"The seed must be a whole number from 0 to {MAX_SEED}, not {seed!r}.")
        img, note = read_upload(image)
        try:
            mask = self.method.mask_at(1, r, torch.Generator().manual_seed(int(s)))  # (1, L) True = hidden
        except SslhubError as e:
            raise gr.Error(f"Choose another masking ratio: {e}") from None
        h, w = self.side
        region = input_region(self.encoder, img).resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(region.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)[None]
        panels = self.method.reconstruction_panels(x, mask)
        hidden, total = int(mask.sum()), mask.shape[1]
        titles = [TITLES[0], f"masked {hidden / total:.0%}", *TITLES[2:]]
        picture = Image.open(io.BytesIO(image_grid(panels, titles, min_side=DISPLAY_SIDE)))
        m = self.method
        text = (f"{self.title}: **{hidden}/{total} patches hidden** (share {hidden / total:.4g}; ratio asked "
                f"{r:g}), seed {int(s)}, {m.cfg.masking} masking"
                f"{f' in cells of {m.scale}×{m.scale} patches' if getattr(m, 'scale', 1) > 1 else ''}, "
                f"on the {w}×{h}-px view the model sees.")
        return picture, "\n\n".join(t for t in (note, text) if t)


def _number(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The {what} must be a number, not {value!r}.") from None
    if not math.isfinite(x):
        raise gr.Error(f"The {what} must be a finite number, not {value!r}.")
    return x
