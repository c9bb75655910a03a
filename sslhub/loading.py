"""``load_encoder(name)``: one loader, one interface, whatever made the weights.

    encoder = load_encoder("runs/simclr/export")        # an sslhub export (or "local-dir:PATH")
    x = encoder.preprocess(pil_image)                   # (3, S, S) the weights' own preprocessing
    feats = encoder.embed_images(["a.jpg", pil, ...])   # (N, encoder.dim)

Weights are read from safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

from .config import from_dict
from .data.augment import eval_transform
from .data.images import BadImage, open_image
from .encoder import Backbone  # also registers the CIFAR-stem variants with timm
from .recipe import EncoderConfig

ImageLike = Union[str, Path, Image.Image]


class LoadError(ValueError):
    """``load_encoder`` could not make sense of its argument; the message says what to do."""


class Encoder:
    """What ``load_encoder`` returns: an image model with its preprocessing.

    ``embed_images`` takes PIL images, file paths, or a tensor — uint8 ``(N, 3, H, W)`` is resized and
    normalised here, float ``(N, 3, S, S)`` is taken as already preprocessed.
    """

    has_text = False
    tokenizer = None

    def __init__(self, model: nn.Module, dim: int, image_size: int, mean, std, config: dict | None = None,
                 name: str = ""):
        self.model = model.eval()
        self.dim, self.image_size = dim, image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.config = config or {}
        self.name = name
        self.device = torch.device("cpu")
        self.preprocess = T.Compose([
            T.PILToTensor(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
            T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dim={self.dim}, image_size={self.image_size}, has_text={self.has_text})"

    def to(self, device: str | torch.device) -> "Encoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _load(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, Image.Image):
            from .data.images import to_rgb

            return self.preprocess(to_rgb(item))
        if isinstance(item, (str, Path)):
            try:
                return self.preprocess(open_image(str(item), str(item)))
            except BadImage as e:
                raise BadImage(f"cannot embed {e}") from None
        raise TypeError(f"expected a PIL image, a path or a tensor, got {type(item).__name__}")

    def _as_batches(self, images, batch_size: int) -> Iterable[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images[None]
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size]
                if x.dtype == torch.uint8:
                    x = eval_transform(x, self.image_size, self.mean, self.std)
                yield x
            return
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        for i in range(0, len(images), batch_size):
            yield torch.stack([self._load(it) for it in images[i : i + batch_size]])

    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 64,
                     normalize: bool = False, progress: bool | None = None) -> torch.Tensor:
        """``(N, dim)`` float32 features on CPU (L2-normalised when ``normalize=True``)."""
        n = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else (
            1 if isinstance(images, (str, Path, Image.Image, torch.Tensor)) else len(images))
        show = progress if progress is not None else n > 8 * batch_size
        out = []
        with tqdm(total=n, desc="embedding images", unit="img", disable=not show, leave=False) as bar:
            for x in self._as_batches(images, batch_size):
                f = self._forward_images(x.to(self.device)).float()
                out.append((F.normalize(f, dim=-1) if normalize else f).cpu())
                bar.update(x.shape[0])
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)

    def _forward_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def embed_text(self, texts: Sequence[str], **kwargs) -> torch.Tensor:
        raise TypeError(f"{self.name or 'this encoder'} has no text tower: embed_text needs an image–text "
                        "model (CLIP, SigLIP, an sslhub CLIP export)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def _load_sslhub_folder(folder: Path) -> Encoder:
    config = _read_json(folder / "config.json")
    s = config["sslhub"]
    enc_cfg = from_dict(EncoderConfig, s["encoder"], where=str(folder / "config.json"), prefix="sslhub.encoder.")
    backbone = Backbone(enc_cfg)
    weights = folder / "model.safetensors"
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
    return Encoder(backbone, backbone.dim, enc_cfg.image_size, enc_cfg.mean, enc_cfg.std, config, name=str(folder))


def load_encoder(name: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Load an encoder from an sslhub export folder (``PATH`` or ``local-dir:PATH``)."""
    text = str(name)
    path = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text)
    if path.is_dir():
        if (path / "config.json").is_file() and "sslhub" in _read_json(path / "config.json"):
            return _load_sslhub_folder(path).to(device)
        raise LoadError(f"{path} is a folder but not a model: expected config.json with an 'sslhub' section "
                        "and model.safetensors (what `sslhub train` exports)")
    raise LoadError(f"cannot load {text!r}: no such folder. Give the folder an `sslhub train` run exported "
                    "(its last output line names it), e.g. load_encoder('runs/simclr/export')")
