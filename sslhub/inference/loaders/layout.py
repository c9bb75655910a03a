"""Recognise a model folder's layout from its files, and load it with its family's loader.

    sslhub        config.json with an "sslhub" section + model.safetensors (``sslhub train`` exports)
    open_clip     open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors
    timm          config.json with "architecture" + model.safetensors (``timm.models.save_for_hf``)
    transformers  config.json with "model_type" + model.safetensors (``save_pretrained``)

A folder may hold several (timm's CLIP repos carry an open_clip model and a timm image tower): the
first complete layout in that order wins. Pickle weights (``*.bin``, ``*.pt``, ``*.pth``) are never
loaded; a folder that has only those is refused with the way to convert a trusted one.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from sslhub import formats
from sslhub.inference.loaders.base import (
    ACCEPTED_FORMS,
    Encoder,
    LoadError,
    pickle_error,
    read_json,
)
from sslhub.inference.loaders.open_clip_encoder import load_open_clip_folder
from sslhub.inference.loaders.sslhub_encoder import load_sslhub_folder
from sslhub.inference.loaders.timm_encoder import load_timm_folder
from sslhub.inference.loaders.transformers_encoder import load_transformers_folder

# transformers model_type → the loader family (transformers_encoder.FAMILIES has the model classes)
TRANSFORMERS_TYPES = ("clip", "siglip", "dinov2", "vit", "vit_mae")


def detect_layout(folder: Path, name: str = "") -> str:
    """``"sslhub" | "open_clip" | "timm" | "transformers"``, or a :class:`LoadError` saying what is missing."""
    what = name or str(folder)
    files = {p.name for p in folder.iterdir() if p.is_file()}
    config = read_json(folder / formats.CONFIG) if formats.CONFIG in files else None
    if config is not None and not isinstance(config, dict):
        raise LoadError(f"{what}: config.json is not a JSON object")
    pickles = sorted(f for f in files if f.endswith(formats.PICKLE_SUFFIXES))
    has_open_clip_cfg = formats.OPEN_CLIP_CONFIG in files
    if config is not None and "sslhub" in config:
        return "sslhub"
    if has_open_clip_cfg and files.intersection(formats.OPEN_CLIP_WEIGHTS_ALT):
        return "open_clip"
    if config is not None and "architecture" in config:
        family, weights = "timm", formats.WEIGHTS in files
    elif config is not None and "model_type" in config:
        if config["model_type"] not in TRANSFORMERS_TYPES:
            raise LoadError(f"{what}: a transformers folder of model_type {config['model_type']!r}, which sslhub "
                            f"does not embed with (supported: {', '.join(TRANSFORMERS_TYPES)})")
        family = "transformers"
        weights = formats.WEIGHTS in files or formats.WEIGHTS_INDEX in files
    elif has_open_clip_cfg:
        family, weights = "open_clip", False
    else:
        if pickles:
            raise pickle_error(what, pickles, formats.WEIGHTS)
        raise LoadError(f"{what} is a folder but not a model (files: {', '.join(sorted(files)[:8]) or 'none'}).\n"
                        f"{ACCEPTED_FORMS}")
    if weights:
        if family == "timm" and has_open_clip_cfg:
            warnings.warn(f"{what}: open_clip_config.json without safetensors open_clip weights; loading the "
                          "timm image tower (model.safetensors) only, without a text tower", stacklevel=3)
        return family
    target = formats.OPEN_CLIP_WEIGHTS if family == "open_clip" else formats.WEIGHTS
    if pickles:
        raise pickle_error(what, pickles, target)
    raise LoadError(f"{what}: a {family} folder without weights: expected {target} beside the config")


def load_folder(folder: Path, name: str) -> Encoder:
    """Load a model folder in any supported layout; ``name`` is what the user gave (for messages)."""
    family = detect_layout(folder, name)
    if family == "sslhub":
        enc = load_sslhub_folder(folder)
    elif family == "timm":
        enc = load_timm_folder(folder, name)
    elif family == "open_clip":
        enc = load_open_clip_folder(folder, name)
    else:
        enc = load_transformers_folder(folder, name)
    enc.name = name
    return enc
