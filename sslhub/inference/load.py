"""``load_encoder(name)``: one loader, one interface, whatever made the weights.

    encoder = load_encoder("runs/simclr/export")        # an sslhub export (or "local-dir:PATH")
    encoder = load_encoder("hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    encoder = load_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    x = encoder.preprocess(pil_image)                   # (3, S, S) the weights' own preprocessing
    feats = encoder.embed_images(["a.jpg", pil, ...])   # (N, encoder.dim)
    text = encoder.embed_text(["a photo of a dog"])     # (N, encoder.dim) where encoder.has_text

Accepted names (``ACCEPTED_FORMS``): a folder (``PATH`` or ``local-dir:PATH``) in any of four layouts —
an sslhub export, timm's Hub layout, open_clip's Hub layout, a transformers ``save_pretrained`` folder —
recognised from its files; ``hf-hub:ORG/NAME[@REVISION]`` (the same layouts, fetched);
``timm:MODEL[.TAG]`` and ``open_clip:ARCH/TAG`` (the libraries' own pretrained weights).
Weights are read from safetensors only: pickle checkpoints are refused (unpickling runs code).

One small ``Encoder`` subclass per family (``sslhub.inference.loaders``) supplies the forward passes;
their base class (``loaders.base``) owns batching, image decoding, text ordering and normalisation.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from sslhub.inference.loaders import hub, layout
from sslhub.inference.loaders.base import ACCEPTED_FORMS, Encoder, LoadError
from sslhub.inference.loaders.open_clip_encoder import load_open_clip_name
from sslhub.inference.loaders.timm_encoder import load_timm_name

_PREFIX = re.compile(r"^([A-Za-z][\w-]*):(.*)$", re.S)  # "timm:resnet18" → ("timm", "resnet18")
PREFIXES = ("local-dir", "hf-hub", "timm", "open_clip")


def _fingerprinted(enc: Encoder, folder: Path | None = None, name: str | None = None) -> Encoder:
    """``enc.fingerprint``: identifies the weights (for caches such as zero-shot class matrices).

    A folder: its resolved path plus the size and modification time of each weights file (a Hub
    snapshot's path holds the commit).  A library name with pretrained weights: the name.  Random
    weights: ``None`` (nothing is cached).
    """
    if folder is not None:
        files = sorted(folder.resolve().glob("*.safetensors"))
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = json.dumps([str(folder.resolve()), stats])
    else:
        key = name
    enc.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16] if key else None
    return enc


def load_encoder(name: str | Path, device: str | torch.device = "cpu", *, pretrained: bool = True) -> Encoder:
    """Load any supported model as an :class:`Encoder` (see ``ACCEPTED_FORMS``).

    ``pretrained=False`` is for ``timm:`` and ``open_clip:`` names only: the architecture with random
    weights (no download).
    """
    text = str(name)
    match = None if isinstance(name, Path) else _PREFIX.match(text)
    prefix, rest = (match.group(1), match.group(2)) if match else (None, text)
    if not pretrained and prefix not in ("timm", "open_clip"):
        raise LoadError(f"{text!r}: pretrained=False only applies to timm:NAME and open_clip:ARCH "
                        "(an architecture without weights); a folder or hf-hub: repo is loaded with its weights")
    if prefix == "local-dir" or prefix is None or (prefix not in PREFIXES and Path(text).exists()):
        path = Path(rest if prefix == "local-dir" else text)
        if not path.exists():
            raise LoadError(f"cannot load {text!r}: no such folder. Give the folder an `sslhub train` run "
                            "exported (its last output line names it), e.g. load_encoder('runs/simclr/export'), "
                            f"or another source.\n{ACCEPTED_FORMS}")
        if not path.is_dir():
            raise LoadError(f"cannot load {text!r}: a file, not a folder. Give the folder that holds it "
                            f"(config.json + model.safetensors …).\n{ACCEPTED_FORMS}")
        return _fingerprinted(layout.load_folder(path, text), folder=path).to(device)
    if prefix == "hf-hub":
        snapshot = hub.fetch_snapshot(rest, text)
        return _fingerprinted(layout.load_folder(snapshot, text), folder=snapshot).to(device)
    if prefix == "timm":
        enc = load_timm_name(rest, text, pretrained)
        return _fingerprinted(enc, name=text if pretrained else None).to(device)
    if prefix == "open_clip":
        enc = load_open_clip_name(rest, text, pretrained)
        return _fingerprinted(enc, name=text if pretrained else None).to(device)
    raise LoadError(f"cannot load {text!r}: unknown prefix {prefix + ':'!r} and no such path.\n{ACCEPTED_FORMS}")
