"""open_clip models: a Hub-layout folder or ``open_clip:ARCH/TAG`` pretrained weights.

    folder/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
    folder/open_clip_model.safetensors
    folder/text_config/config.json      (optional) the config of a transformers text tower, so that a
                                        model whose text_cfg names a Hub model builds offline

Images go through ``model.encode_image``, text through the model's tokenizer and its text tower.
For open_clip's standard ``CLIP`` text tower the text is encoded *trimmed*: the tokenizer pads every
text to the context length (77), but the attention is causal and the features are pooled at one
position p per text (the EOT token: ``argmax`` of the ids, or the first ``eos_id``), so positions
after p never influence them. A batch therefore runs only up to ``L = max(p) + 1`` positions:
``token_embedding(ids[:, :L]) + positional_embedding[:L]`` → transformer with ``attn_mask[:L, :L]`` →
``ln_final`` → pool at p → ``text_projection`` — exactly ``model.encode_text(ids)``, for a fraction
of the cost when texts are short (zero-shot prompts are ~10–20 tokens). Towers it does not recognise
(HF text towers, CoCa, bidirectional or ``last``/``first`` pooling) use ``model.encode_text``.

open_clip logs to the root logger; while it builds a model its records are held back, and dropped for
sslhub's own ``LoadError`` when the build fails (no "ERROR:root:Failed to download" before it).

A folder's weights are its ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.safetensors``),
loaded by sslhub naming that file: open_clip is asked to build the architecture without weights, since
its local-dir loader picks a checkpoint by its own preference list, which puts
``open_clip_pytorch_model.bin`` (a pickle) before ``model.safetensors``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from sslhub import formats
from sslhub.inference.loaders.base import Encoder, LoadError, read_json
from sslhub.inference.loaders.hub import download_error, is_network_error, network_guard

log = logging.getLogger(__name__)


def trim_unsupported_reason(model: nn.Module) -> str | None:
    """``None`` when ``encode_text_trimmed`` is exact for this model, else why it is not used."""
    import open_clip
    from open_clip.transformer import Transformer

    if not isinstance(model, open_clip.CLIP) or type(model).encode_text is not open_clip.CLIP.encode_text:
        return f"{type(model).__name__} is not open_clip's standard CLIP"
    if not isinstance(model.transformer, Transformer):
        return f"text transformer is a {type(model.transformer).__name__}"
    if model.text_pool_type not in ("argmax", "eos"):
        return f"text pooling {model.text_pool_type!r} is not at one token"
    mask = model.attn_mask
    if mask is None or mask.dim() != 2 or mask.shape[0] != model.positional_embedding.shape[0]:
        return "text attention is not causal"
    causal = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    if not torch.equal(mask, causal):
        return "text attention mask is not the standard causal one"
    return None


def encode_text_trimmed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(ids)`` computed on the first ``max(pool position) + 1`` tokens only.

    ids: (B, C) token ids padded to the context length C → (B, embed_dim) unnormalised features.
    """
    if model.text_pool_type == "argmax":
        pos = ids.argmax(dim=-1)  # (B,) the EOT token: the highest id in CLIP's vocabulary
    else:
        pos = (ids == model.text_eos_id).int().argmax(dim=-1)  # (B,) first eos_id
    length = int(pos.max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids[:, :length]).to(cast_dtype)  # (B, L, W)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)  # (B, L, W)
    x = x[torch.arange(x.shape[0], device=x.device), pos]  # (B, W)
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x  # (B, embed_dim)


class OpenClipEncoder(Encoder):
    """An open_clip image–text model: ``encode_image`` / (trimmed) ``encode_text``."""

    kind = "open_clip"
    has_text = True
    # relative error allowed between trimmed and full text features in the one-time runtime check
    TRIM_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}

    def __init__(self, model: nn.Module, preprocess, tokenizer, embed_dim: int, name: str, config: dict):
        import open_clip

        pp = open_clip.get_model_preprocess_cfg(model)  # size, mean, std, interpolation, resize_mode
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        super().__init__(model, embed_dim, size if isinstance(size, int) else tuple(size), pp["mean"], pp["std"],
                         config=config, name=name, preprocess=preprocess,
                         interpolation=pp.get("interpolation", "bicubic"))
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().exp().flatten()[0])
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().flatten()[0])
        self.trim_reason = trim_unsupported_reason(model)  # None: text is encoded trimmed
        self._trim_checked = False

    @property
    def trims_text(self) -> bool:
        return self.trim_reason is None

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)  # (B, embed_dim)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts).to(self.device)  # (B, C)
        if not self.trims_text:
            return self.model.encode_text(ids)
        out = encode_text_trimmed(self.model, ids)
        if not self._trim_checked:
            self._check_trim(ids[:4], out[:4])
        return out if self.trims_text else self.model.encode_text(ids)

    def _check_trim(self, ids: torch.Tensor, trimmed: torch.Tensor) -> None:
        """Once per encoder: trimmed features must equal ``model.encode_text``, else stop trimming."""
        self._trim_checked = True
        full = self.model.encode_text(ids)
        err = ((trimmed - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).max().item()
        if err > self.TRIM_CHECK_RTOL.get(full.dtype, 5e-3):
            self.trim_reason = f"trimmed text features differ from encode_text (relative error {err:.2e})"
            warnings.warn(f"{self.name}: {self.trim_reason}; using the full encode_text", stacklevel=4)


# open_clip's records that are wrong when sslhub loads the weights itself, after open_clip built the model
_BUILT_WITHOUT_WEIGHTS = ("No pretrained weights loaded", "No potential checkpoint path found",
                         "Potential checkpoint path")


@contextlib.contextmanager
def held_open_clip_logs(drop: tuple[str, ...] = ()) -> Iterator[None]:
    """Hold what open_clip logs (to the root logger) during the block: passed on to the root logger's handlers
    after a success (except records whose message starts with one of ``drop``), logged at DEBUG after a
    failure (sslhub's error says what went wrong).

    A handler is on the root logger meanwhile: ``logging.error`` would otherwise install a stderr one
    (``basicConfig``) in the user's process.
    """
    import open_clip

    package = os.path.dirname(open_clip.__file__) + os.sep
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.pathname.startswith(package):
            held.append(record)
            return False
        return True

    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    root.addFilter(hold)
    failed = True
    try:
        yield
        failed = False
    finally:
        root.removeFilter(hold)
        root.removeHandler(guard)
        for record in held:
            if failed or record.getMessage().startswith(drop):
                log.debug("open_clip: %s", record.getMessage())
            else:
                root.handle(record)


def _build(fn, name: str, local: bool, drop: tuple[str, ...] = ()):
    net = None
    try:
        with held_open_clip_logs(drop), network_guard() as net:
            return fn()
    except LoadError:
        raise
    except Exception as e:
        if is_network_error(e) and not local:
            raise download_error(name, e, net) from e
        raise LoadError(f"{name}: open_clip could not build the model ({type(e).__name__}: {e})") from e


def load_open_clip_folder(folder: Path, name: str) -> OpenClipEncoder:
    """open_clip_config.json + open_clip_model.safetensors (the layout ``hf-hub:`` open_clip repos use)."""
    import open_clip

    config = read_json(folder / formats.OPEN_CLIP_CONFIG)
    if not isinstance(config.get("model_cfg"), dict) or "embed_dim" not in config["model_cfg"]:
        raise LoadError(f"{name}: open_clip_config.json has no model_cfg with embed_dim (expected "
                        '{"model_cfg": {...}, "preprocess_cfg": {...}})')
    spec = f"local-dir:{folder.resolve()}"
    overrides = {}
    text_cfg = config["model_cfg"].get("text_cfg", {})
    if text_cfg.get("hf_model_name") and (folder / formats.TEXT_CONFIG_DIR / formats.CONFIG).is_file():
        # A transformers text tower (sslhub's CLIP exports): its config travels in the folder, so the
        # tower is built offline; the weights come from open_clip_model.safetensors as usual.
        overrides["text_cfg"] = {**text_cfg, "hf_model_name": str((folder / formats.TEXT_CONFIG_DIR).resolve()),
                                 "hf_model_pretrained": False}
    weights = next((folder.resolve() / f for f in formats.OPEN_CLIP_WEIGHTS_ALT if (folder / f).is_file()), None)
    if weights is None:
        raise LoadError(f"{name}: an open_clip folder without weights: expected {formats.OPEN_CLIP_WEIGHTS}")

    def build():
        # the architecture only (no checkpoint of open_clip's choosing, no base text/image tower weights) …
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec, load_weights=False, pretrained_image=False, pretrained_text=False, **overrides)
        open_clip.load_checkpoint(model, str(weights), strict=True)  # … then exactly this safetensors file
        return model, preprocess

    model, preprocess = _build(build, name, local=True, drop=_BUILT_WITHOUT_WEIGHTS)
    tokenizer = _build(lambda: open_clip.get_tokenizer(spec), name, local=True)
    return OpenClipEncoder(model, preprocess, tokenizer, config["model_cfg"]["embed_dim"], name, config)


def load_open_clip_name(spec: str, name: str, pretrained: bool = True) -> OpenClipEncoder:
    """``open_clip:ARCH/TAG``: open_clip fetches its own pretrained weights (``pretrained=False``: random)."""
    import open_clip

    arch, _, tag = spec.strip().rpartition("/") if "/" in spec else (spec.strip(), "", "")
    arch = arch.replace("/", "-")  # "ViT-B/32" is open_clip's "ViT-B-32"
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower() in m.lower()][:8]
        raise LoadError(f"{name}: {arch!r} is not an open_clip architecture"
                        + (f" (close: {', '.join(close)})" if close else "") + "; see open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained and tag not in tags:
        raise LoadError(f"{name}: give one of the pretrained tags of {arch}: "
                        + (", ".join(f"open_clip:{arch}/{t}" for t in tags[:8]) or "(none: use pretrained=False)")
                        + " — without a tag open_clip builds random weights")
    model, _, preprocess = _build(
        lambda: open_clip.create_model_and_transforms(arch, pretrained=tag if pretrained else None), name, local=False)
    tokenizer = _build(lambda: open_clip.get_tokenizer(arch), name, local=False)
    config = {"model_cfg": open_clip.get_model_config(arch), "pretrained": tag if pretrained else None}
    return OpenClipEncoder(model, preprocess, tokenizer, config["model_cfg"]["embed_dim"], name, config)
