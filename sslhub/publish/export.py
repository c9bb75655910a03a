"""Export a trained backbone as a self-describing Hugging Face–style folder.

    export/
      config.json        timm's Hub layout (architecture, model_args, pretrained_cfg) + an "sslhub"
                         section (encoder config, method, recipe, steps, evaluation figures)
      model.safetensors  the backbone's weights under timm's own parameter names
      README.md          the model card (``sslhub.publish.card``)

``timm.create_model("local-dir:export", pretrained=True)`` loads it (after ``import sslhub`` for the
CIFAR-stem variants, which are not timm architectures); ``sslhub.load_encoder("export")`` too.
The folder is built aside and swapped in, so a reader never sees half an export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sslhub import formats
from sslhub._version import __version__
from sslhub.atomic import replace_folder
from sslhub.models.backbone import Backbone
from sslhub.publish.card import render_card


def export_encoder(backbone: Backbone, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    info = dict(info or {})
    config = backbone.timm_config()
    config["sslhub"].update({"format": formats.ENCODER_FORMAT, "format_version": formats.FORMAT_VERSION, "sslhub_version": __version__, **info})
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / formats.WEIGHTS), metadata={"format": "pt"})
        (tmp / formats.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(render_card(config))

    return replace_folder(folder, build)
