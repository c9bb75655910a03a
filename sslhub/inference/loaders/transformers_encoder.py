"""transformers models from a ``save_pretrained`` folder: CLIP, SigLIP, DINOv2, ViT, ViT-MAE.

    model_type   model class     image embedding (dim)                          text
    clip         CLIPModel       get_image_features (projection_dim)            get_text_features
    siglip       SiglipModel     get_image_features (vision hidden_size)        get_text_features
    dinov2       Dinov2Model     CLS token of last_hidden_state (hidden_size)   —
    vit          ViTModel        CLS token of last_hidden_state (hidden_size)   —
    vit_mae      ViTMAEModel     mean of the patch tokens, nothing masked       —

Preprocessing is the folder's own image processor (preprocessor_config.json, ``AutoImageProcessor``);
a folder without one gets the family's usual mean/std at ``config.image_size``, with a warning.
Text needs tokenizer files in the folder (``AutoTokenizer``). In transformers 5 ``get_*_features``
return a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding; older
versions return the tensor itself — both are handled.

transformers' own loading output (a progress bar, a colour-coded report of unused weights) is kept off
stderr: weights missing from ``model.safetensors`` or of another shape are a ``LoadError``, unused ones
are logged at DEBUG.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from sslhub import formats
from sslhub.inference.loaders.base import Encoder, LoadError, read_json

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes
log = logging.getLogger(__name__)


def _pooled(out) -> torch.Tensor:
    """A ``get_*_features`` result → ``(B, D)``: the tensor (transformers 4) or its ``pooler_output`` (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[1]


class _ProcessorTransform:
    """PIL image → ``(3, S, S)`` through a transformers image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"_ProcessorTransform({type(self.processor).__name__})"


class TransformersEncoder(Encoder):
    """Shared by the transformers families: the folder's image processor as ``preprocess``."""

    kind = "transformers"
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, model: nn.Module, folder: Path, name: str, dim: int, vision_config):
        from transformers import AutoImageProcessor

        proc = None
        if (folder / formats.PREPROCESSOR_CONFIG).is_file():
            try:
                proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # transformers raises OSError/ValueError/KeyError for bad processor files
                raise LoadError(f"{name}: preprocessor_config.json could not be read ({type(e).__name__}: {e})") from e
        if proc is None:
            size = vision_config.image_size
            warnings.warn(f"{name}: no preprocessor_config.json; using mean/std {self.default_mean}/{self.default_std} "
                          f"at {size}px (save the image processor beside the model to pin its preprocessing)",
                          stacklevel=4)
            super().__init__(model, dim, size, self.default_mean, self.default_std, config=model.config.to_dict(),
                             name=name, interpolation="bicubic")
            return
        size = dict(proc.size if isinstance(proc.size, dict) else proc.size or {})
        crop = dict(proc.crop_size or {}) if getattr(proc, "do_center_crop", False) else {}
        h = crop.get("height") or size.get("height") or size.get("shortest_edge")
        w = crop.get("width") or size.get("width") or size.get("shortest_edge")
        crop_pct = h / size["shortest_edge"] if crop and size.get("shortest_edge") else 1.0
        super().__init__(model, dim, (h, w), proc.image_mean, proc.image_std, config=model.config.to_dict(),
                         name=name, preprocess=_ProcessorTransform(proc),
                         interpolation=_RESAMPLE.get(int(getattr(proc, "resample", 3) or 3), "bicubic"),
                         crop_pct=crop_pct)
        self.image_processor = proc


class HFClipEncoder(TransformersEncoder):
    """CLIP / SigLIP: image and text towers with a shared embedding space."""

    default_mean, default_std = OPENAI_MEAN, OPENAI_STD

    def __init__(self, model: nn.Module, folder: Path, name: str, dim: int):
        super().__init__(model, folder, name, dim, model.config.vision_config)
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().flatten()[0])
        self.tokenizer = _tokenizer(folder, name)
        self.has_text = self.tokenizer is not None
        if not self.has_text:
            self.no_text_reason = ("has a text tower but no tokenizer files (tokenizer.json, vocab.json …): save the "
                                   "tokenizer beside the model (tokenizer.save_pretrained(folder)) to embed text")
        self.max_length = model.config.text_config.max_position_embeddings

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=x))  # (B, dim)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                    attention_mask=tok["attention_mask"].to(self.device)))


class HFSiglipEncoder(HFClipEncoder):
    """SigLIP was trained on texts padded to max_length, with no attention mask: embed them the same way."""

    default_mean, default_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device)))


class HFClsEncoder(TransformersEncoder):
    """DINOv2 / ViT: the (final-norm) CLS token."""

    def __init__(self, model: nn.Module, folder: Path, name: str, dim: int):
        super().__init__(model, folder, name, dim, model.config)

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]  # (B, hidden)


class HFMaeEncoder(TransformersEncoder):
    """ViT-MAE with ``mask_ratio=0``: the mean of all patch tokens (He et al. 2022 §A.1 linear probing)."""

    def __init__(self, model: nn.Module, folder: Path, name: str, dim: int):
        super().__init__(model, folder, name, dim, model.config)

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        p = self.model.config.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)  # keep patch order
        return self.model(pixel_values=x, noise=noise).last_hidden_state[:, 1:].mean(dim=1)  # (B, hidden)


# model_type → (transformers class, encoder class, from_pretrained overrides, embedding size from config)
FAMILIES = {
    "clip": ("CLIPModel", HFClipEncoder, {}, lambda c: c.projection_dim),
    "siglip": ("SiglipModel", HFSiglipEncoder, {}, lambda c: c.vision_config.hidden_size),
    "dinov2": ("Dinov2Model", HFClsEncoder, {}, lambda c: c.hidden_size),
    "vit": ("ViTModel", HFClsEncoder, {"add_pooling_layer": False}, lambda c: c.hidden_size),
    "vit_mae": ("ViTMAEModel", HFMaeEncoder, {"mask_ratio": 0.0}, lambda c: c.hidden_size),
}


def _tokenizer(folder: Path, name: str):
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # OSError, ValueError, ImportError (sentencepiece missing) …
        raise LoadError(f"{name}: tokenizer files found but not loadable ({type(e).__name__}: {e})") from e


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' warnings (its load report) and progress bars off for the block, as they were after it."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars_on, hub_bars_off = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                        are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
            if hub_bars_off:
                disable_progress_bars()


def load_transformers_folder(folder: Path, name: str) -> TransformersEncoder:
    import transformers

    model_type = read_json(folder / formats.CONFIG)["model_type"]
    cls_name, enc_cls, overrides, dim_of = FAMILIES[model_type]
    try:
        with quiet_loading():  # what its report would say is checked below
            model, info = getattr(transformers, cls_name).from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True, **overrides)
    except Exception as e:  # OSError (files), ValueError/RuntimeError (config or shapes)
        raise LoadError(f"{name}: transformers could not load {cls_name} ({type(e).__name__}: {e})") from e
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise LoadError(f"{name}: model.safetensors does not fit {cls_name}: {len(missing)} weights missing "
                        f"(e.g. {missing[:3]}); was it saved from another model class?")
    if info.get("mismatched_keys"):
        key, saved, built = sorted(info["mismatched_keys"])[0]
        raise LoadError(f"{name}: model.safetensors does not fit {cls_name} built from config.json: "
                        f"{len(info['mismatched_keys'])} weights of another shape (e.g. {key}: {tuple(saved)} saved, "
                        f"{tuple(built)} built); do the config and the weights belong together?")
    if info.get("unexpected_keys"):
        unused = sorted(info["unexpected_keys"])
        log.debug("%s: %d weights of model.safetensors not used by %s (e.g. %s)", name, len(unused), cls_name,
                  unused[:3])
    return enc_cls(model, folder, name, dim_of(model.config))
