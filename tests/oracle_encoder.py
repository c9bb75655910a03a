"""An oracle encoder for checking the evaluation wiring (issue 14): every image is embedded as the text
embedding of texts the test chose for it — its own captions or class name, or deliberately wrong ones.

The oracle knows the images of some shards (decoded here with tarfile + PIL, not with sslhub's readers)
and recognises each image it is asked to embed by its pixels: the nearest reference image, which must
match to well under one grey level RMS (the bundled images are ≥ 24 levels RMS apart), or the oracle
raises. So it cares nothing for the order, batching or number of the images it is given.

Its text tower is exact and has no learned parts. Every "unit" of text gets its own axis (one-hot):

- ``mode="words"``: a unit is a lower-case word; a text is the sum of its words' axes (bag of words).
  Zero-shot prompts like "a blurry photo of a cat." then share their template words across classes and
  differ only by the class word, so an image embedded as ``"cat"`` scores the same positive value with
  the "cat" row of the class matrix and exactly 0 with every other class.
- ``mode="sentences"``: a unit is a whole text; distinct captions are orthogonal.

An image's embedding is the sum of the (raw) text embeddings of its texts, so repeating a text weights it:
``["dog", "dog", "cat"]`` ranks dog first and cat second, every other class after them (score 0).

Axes are allotted process-wide (the same unit has the same axis in every oracle instance), so a class
matrix cached by one oracle is right for any other.

``install(monkeypatch)`` makes ``load_encoder`` (and so the real CLI) load a folder holding an
``oracle.json`` as an oracle, through sslhub's own path handling; ``write_oracle`` writes such a folder.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sslhub.inference.loaders import layout
from sslhub.inference.loaders.base import Encoder

ORACLE_FILE = "oracle.json"
TEXT_DIM = 2048
MATCH_RMS = 1.0  # grey levels (0–255): an image that is not this close to a reference is not recognised
_AXES: dict[tuple[str, str], int] = {}  # (mode, unit) → axis, shared by every oracle in the process


def read_shard(path: str | Path) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of a tar(.gz) shard, in member order."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.rsplit(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return groups


def rgb(jpg: bytes) -> np.ndarray:
    """``(H, W, 3)`` uint8."""
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.uint8)


def units(text: str, mode: str) -> list[str]:
    if mode == "words":
        return re.findall(r"[a-z0-9]+", text.lower())
    if mode == "sentences":
        return [text.strip()]
    raise ValueError(f"oracle mode {mode!r}: expected 'words' or 'sentences'")


def axis(mode: str, unit: str) -> int:
    key = (mode, unit)
    if key not in _AXES:
        if len(_AXES) >= TEXT_DIM:
            raise RuntimeError(f"oracle: more than {TEXT_DIM} distinct text units; raise TEXT_DIM")
        _AXES[key] = len(_AXES)
    return _AXES[key]


def raw_text_embedding(text: str, mode: str) -> torch.Tensor:
    v = torch.zeros(TEXT_DIM)
    for u in units(text, mode):
        v[axis(mode, u)] += 1.0
    if not v.any():
        raise ValueError(f"oracle: text {text!r} has no {mode}")
    return v


class OracleEncoder(Encoder):
    kind = "oracle"
    has_text = True

    def __init__(self, mode: str, references: dict[str, np.ndarray], texts: dict[str, list[str]], name: str = ""):
        sizes = {a.shape for a in references.values()}
        if len(sizes) != 1:
            raise ValueError(f"oracle: reference images of several sizes {sizes}")
        h, w, _ = sizes.pop()
        if h != w:
            raise ValueError("oracle: square reference images only")
        missing = sorted(set(references) - set(texts))
        if missing:
            raise ValueError(f"oracle: no texts for {len(missing)} reference image(s), e.g. {missing[0]}")
        # mean 0, std 1: the tensors _forward_images gets are the decoded pixels / 255, no resize (native size)
        super().__init__(nn.Identity(), TEXT_DIM, h, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name=name)
        self.mode = mode
        self.keys = list(references)
        self.refs = torch.from_numpy(np.stack([references[k] for k in self.keys])).permute(0, 3, 1, 2)
        self.refs = self.refs.reshape(len(self.keys), -1).double()  # (R, 3*S*S) in 0..255
        self.image_texts = {k: list(texts[k]) for k in self.keys}
        self.embeddings = torch.stack([sum(raw_text_embedding(t, mode) for t in texts[k]) for k in self.keys])
        self.seen: list[str] = []  # the keys recognised, in the order embedded

    def identify(self, x: torch.Tensor) -> list[int]:
        """Reference index of each preprocessed image ``(B, 3, S, S)`` (pixels / 255)."""
        flat = (x.detach().double().cpu() * 255.0).reshape(x.shape[0], -1)
        if flat.shape[1] != self.refs.shape[1]:
            raise AssertionError(f"oracle: got images of shape {tuple(x.shape[1:])}, knows "
                                 f"{self.refs.shape[1]}-value images")
        rms = torch.cdist(flat, self.refs) / flat.shape[1] ** 0.5  # (B, R)
        best = rms.min(1)
        bad = best.values > MATCH_RMS
        if bad.any():
            i = int(bad.nonzero()[0])
            raise AssertionError(f"oracle: image {i} of a batch matches no reference image (nearest "
                                 f"{self.keys[int(best.indices[i])]} at {float(best.values[i]):.2f} grey levels RMS)")
        return best.indices.tolist()

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.identify(x)
        self.seen.extend(self.keys[i] for i in idx)
        return self.embeddings[idx].to(x.device)

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([raw_text_embedding(t, self.mode) for t in texts])


def write_oracle(folder: str | Path, mode: str, shards: list[str | Path], texts: dict[str, list[str]]) -> Path:
    """A folder the patched ``load_encoder`` loads as an :class:`OracleEncoder`.

    ``texts``: per image key (the shard member name without extension), the texts it is embedded as.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ORACLE_FILE).write_text(json.dumps({"mode": mode, "shards": [str(s) for s in shards],
                                                  "texts": texts}))
    return folder


def load_oracle_folder(folder: Path, name: str) -> OracleEncoder:
    cfg = json.loads((folder / ORACLE_FILE).read_text())
    refs = {key: rgb(files["jpg"]) for shard in cfg["shards"] for key, files in read_shard(shard).items()}
    return OracleEncoder(cfg["mode"], refs, cfg["texts"], name=name)


LOADED: list[OracleEncoder] = []  # every oracle loaded since install(), newest last


def install(monkeypatch) -> list[OracleEncoder]:
    """Make folders with an ``oracle.json`` load as oracles (``layout.load_folder``, which ``load_encoder``
    calls for a local folder); every other folder loads as before. Returns the list of loaded oracles."""
    real = layout.load_folder
    LOADED.clear()

    def load_folder(folder: Path, name: str):
        if (Path(folder) / ORACLE_FILE).is_file():
            enc = load_oracle_folder(Path(folder), name)
            LOADED.append(enc)
            return enc
        return real(folder, name)

    monkeypatch.setattr(layout, "load_folder", load_folder)
    return LOADED
