"""sslhub's own exports (``sslhub train``): a timm backbone rebuilt from the ``sslhub`` config section."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from sslhub import formats
from sslhub.config import from_dict
from sslhub.inference.loaders.base import Encoder, LoadError, read_json
from sslhub.inference.loaders.timm_encoder import check_model_args
from sslhub.models.backbone import Backbone, EncoderConfig


class SslhubEncoder(Encoder):
    """An ``sslhub train`` export: a timm backbone with sslhub's encoder config."""

    kind = "sslhub"


def load_sslhub_folder(folder: Path) -> Encoder:
    config = read_json(folder / formats.CONFIG)
    s = config["sslhub"]
    if not isinstance(s, dict) or not isinstance(s.get("encoder"), dict):
        raise LoadError(f"{folder / formats.CONFIG}: the \"sslhub\" section has no \"encoder\" object")
    # Backbone calls timm.create_model(arch, **model_args): a checkpoint_path there would be torch.load-ed
    check_model_args(s["encoder"].get("model_args"), f"{folder / formats.CONFIG}: sslhub.encoder")
    enc_cfg = from_dict(EncoderConfig, s["encoder"], where=str(folder / formats.CONFIG), prefix="sslhub.encoder.")
    backbone = Backbone(enc_cfg)
    weights = folder / formats.WEIGHTS
    if not weights.is_file():
        raise LoadError(f"{folder}: config.json found but no model.safetensors (only safetensors weights are loaded)")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise LoadError(f"{weights}: not a readable safetensors file ({e})") from None
    missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LoadError(f"{weights}: weights do not fit {backbone.arch} "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return SslhubEncoder(backbone, backbone.dim, enc_cfg.image_size, enc_cfg.mean, enc_cfg.std, config,
                         name=str(folder))


