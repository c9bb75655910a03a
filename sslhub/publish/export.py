"""Export a trained backbone as a self-describing Hugging Face–style folder.

    export/
      config.json        timm's Hub layout (architecture, model_args, pretrained_cfg) + an "sslhub"
                         section (encoder config, method, recipe, steps, evaluation figures)
      model.safetensors  the backbone's weights under timm's own parameter names
      README.md          the model card (``sslhub.publish.card``)

``timm.create_model("local-dir:export", pretrained=True)`` loads it (after ``import sslhub`` for the
CIFAR-stem variants, which are not timm architectures); ``sslhub.load_encoder("export")`` too.
The folder is built aside and swapped in, so a reader never sees half an export; ``write_export`` is
shared by every layout (the open_clip one of CLIP included).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from sslhub import formats
from sslhub._version import __version__
from sslhub.atomic import replace_folder
from sslhub.models.backbone import Backbone
from sslhub.publish.card import render_card

Evaluate = Callable[[Path], dict]  # folder written so far → evaluation figures (config["sslhub"]["eval"])


def write_export(folder: str | Path, config: dict[str, Any], config_name: str, weights: dict[str, torch.Tensor],
                 weights_name: str, add_files: Callable[[Path], None] | None = None,
                 evaluate: Evaluate | None = None) -> Path:
    """Build an export folder aside and swap it in once: weights, config (+ ``add_files``), card.

    With ``evaluate``, the folder is first written complete without figures, ``evaluate(tmp)`` loads and
    evaluates it exactly as a user would load it, and its figures are merged into
    ``config["sslhub"]["eval"]`` before the config and the card are written again — the weights are written
    once and the folder is swapped in once, with its figures.
    """
    config = copy.deepcopy(config)

    def write_config(tmp: Path) -> None:
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / formats.CARD).write_text(render_card(config))

    def build(tmp: Path) -> None:
        save_file(weights, str(tmp / weights_name), metadata={"format": "pt"})
        if add_files is not None:
            add_files(tmp)
        write_config(tmp)
        if evaluate is not None:
            figures = evaluate(tmp)
            if figures:
                config["sslhub"]["eval"] = {**config["sslhub"].get("eval", {}), **figures}
                write_config(tmp)

    return replace_folder(folder, build)


Files = dict[str, tuple[bytes, str]]  # extra files of an export: name → (bytes, caption; a caption = a picture)


def extra_files(config: dict[str, Any], files: Files | None) -> Callable[[Path], None] | None:
    """``add_files`` for ``write_export`` that writes ``files``; pictures (a caption) are listed in
    ``config["sslhub"]["pictures"]`` so the card shows them."""
    if not files:
        return None
    pictures = {name: caption for name, (_, caption) in files.items() if caption}
    if pictures:
        config.setdefault("sslhub", {})["pictures"] = pictures

    def add(tmp: Path) -> None:
        for name, (data, _) in files.items():
            (tmp / name).write_bytes(data)

    return add


def export_encoder(backbone: Backbone, folder: str | Path, info: dict[str, Any] | None = None,
                   evaluate: Evaluate | None = None, files: Files | None = None) -> Path:
    """A timm backbone in timm's Hub layout (``config.json`` + ``model.safetensors``) + the card (+ ``files``)."""
    config = backbone.timm_config()
    config["sslhub"].update({"format": formats.ENCODER_FORMAT, "format_version": formats.FORMAT_VERSION,
                             "sslhub_version": __version__, **(info or {})})
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    return write_export(folder, config, formats.CONFIG, state, formats.WEIGHTS, add_files=extra_files(config, files),
                        evaluate=evaluate)
