"""timm image models: a Hub-layout folder (``save_for_hf``) or ``timm:MODEL[.TAG]`` pretrained weights.

Built with ``num_classes=0`` so the forward returns pooled features ``(B, dim)``; the preprocessing is
timm's own eval transform from the weights' pretrained config (input size, mean, std, interpolation,
crop_pct), ``timm.data.create_transform(**resolve_model_data_config(model))``.

A folder's weights are read from its ``model.safetensors``, named to timm explicitly (its local-dir
loader would otherwise pick a file by its own preference list, which has pickles in it), and the
config's ``model_args`` may not name files or weight sources of their own (``checkpoint_path`` …).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from sslhub import formats
from sslhub.inference.loaders.base import Encoder, LoadError, read_json
from sslhub.inference.loaders.hub import download_error, is_network_error, network_guard


class TimmEncoder(Encoder):
    """``h = model(x)``: a timm model without its classifier."""

    kind = "timm"

    def __init__(self, model: nn.Module, name: str):
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)  # input_size, interpolation, mean, std, crop_pct, ...
        _, h, w = cfg["input_size"]
        dim = getattr(model, "head_hidden_size", None) or model.num_features  # what num_classes=0 returns
        super().__init__(model, dim, (h, w), cfg["mean"], cfg["std"], config=dict(model.pretrained_cfg or {}),
                         name=name, preprocess=timm.data.create_transform(**cfg, is_training=False),
                         interpolation=cfg.get("interpolation", "bilinear"), crop_pct=cfg.get("crop_pct", 1.0))


WEIGHT_SOURCE_ARGS = formats.WEIGHT_SOURCE_ARGS


def check_model_args(model_args, where: str) -> None:
    """Refuse a config's ``model_args`` that is not a mapping or that names a weight source of its own."""
    if model_args is None:
        return
    if not isinstance(model_args, dict):
        raise LoadError(f"{where}: model_args is not a JSON object")
    bad = sorted(k for k in model_args if k in WEIGHT_SOURCE_ARGS)
    if bad:
        raise LoadError(f"{where}: model_args sets {', '.join(bad)}, which would make timm load weights from "
                        "somewhere other than the folder's model.safetensors (a pickle checkpoint, a download); "
                        "refused — remove it from the config")


def _create(spec: str, name: str, pretrained: bool, weights: Path | None = None) -> nn.Module:
    import timm

    # a folder: load exactly its safetensors file, whatever else lies beside it
    overlay = None if weights is None else {
        "source": "", "file": str(weights), "state_dict": None, "url": None, "hf_hub_id": None, "custom_load": False}
    net = None
    try:
        with network_guard() as net:
            return timm.create_model(spec, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay)
    except LoadError:
        raise
    except Exception as e:
        if is_network_error(e) and not spec.startswith("local-dir:"):
            raise download_error(name, e, net) from e
        raise LoadError(f"{name}: timm could not build the model ({type(e).__name__}: {e})") from e


def load_timm_folder(folder: Path, name: str) -> TimmEncoder:
    """A folder with timm's config.json (``"architecture"``) and model.safetensors."""
    import timm

    config = read_json(folder / formats.CONFIG)
    arch = config["architecture"]
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise LoadError(f"{name}: config.json names architecture {arch!r}, which this timm ({timm.__version__}) "
                        "does not have; a newer timm may (pip install -U timm)")
    check_model_args(config.get("model_args"), f"{name}: config.json")
    weights = folder.resolve() / formats.WEIGHTS
    return TimmEncoder(_create(f"local-dir:{folder.resolve()}", name, True, weights), name)


def load_timm_name(spec: str, name: str, pretrained: bool = True) -> TimmEncoder:
    """``timm:MODEL[.TAG]``: timm fetches its own pretrained weights (``pretrained=False``: random init)."""
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(spec.strip())
    if not arch or not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:8] if arch else []
        raise LoadError(f"{name}: {arch!r} is not a timm architecture"
                        + (f" (close: {', '.join(close)})" if close else "") + "; see timm.list_models()")
    if pretrained and not timm.list_pretrained(f"{arch}.{tag}" if tag else f"{arch}.*"):
        tags = timm.list_pretrained(f"{arch}.*")[:8]
        raise LoadError(f"{name}: timm has no pretrained weights {spec!r}"
                        + (f"; available: {', '.join(tags)}" if tags else "") +
                        " (load_encoder(name, pretrained=False) gives the architecture with random weights)")
    return TimmEncoder(_create(spec.strip(), name, pretrained), name)
