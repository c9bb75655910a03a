"""The loaders' base: the ``Encoder`` interface every family implements, ``LoadError``, ``read_json``.

One small ``Encoder`` subclass per family (``timm_encoder``, ``open_clip_encoder``,
``transformers_encoder``, ``sslhub_encoder``) supplies the forward passes; this base class owns batching,
image decoding, text ordering and normalisation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from sslhub.data.augment import eval_transform, normalize, to_float
from sslhub.data.images import BadImage, open_image, to_rgb
from sslhub.errors import SslhubError, UnsupportedError

ImageLike = Union[str, Path, Image.Image]

ACCEPTED_FORMS = """accepted forms:
  PATH or local-dir:PATH       a folder: an sslhub export; timm's Hub layout (config.json with
                               "architecture" + model.safetensors); open_clip's (open_clip_config.json +
                               open_clip_model.safetensors); transformers save_pretrained (config.json with
                               model_type clip, siglip, dinov2, vit or vit_mae + model.safetensors)
  hf-hub:ORG/NAME[@REVISION]   one of those layouts on the Hugging Face Hub
  timm:MODEL[.TAG]             timm's own pretrained weights, e.g. timm:resnet50.a1_in1k
  open_clip:ARCH/TAG           open_clip's own pretrained weights, e.g. open_clip:ViT-B-32/laion2b_s34b_b79k"""

class LoadError(SslhubError, ValueError):
    """``load_encoder`` could not make sense of its argument; the message says what to do."""


class RGBFirst:
    """``encoder.preprocess``: a PIL image in any mode → :func:`to_rgb`, then the family's own transform.

    The families' transforms assume RGB: timm's and the default one turn a palette (``P``) image into one
    channel of palette indices and a grey + alpha (``LA``) one into two channels, and the open_clip and
    transformers ones drop transparency (``convert("RGB")``) instead of compositing it on white as training
    data is. Wrapping them makes ``encoder.preprocess(img)`` agree with ``embed_images([img])`` and with the
    training-data decode for every mode. Anything else (a tensor) goes to the transform unchanged; the
    transform's own attributes (``transforms`` of a ``Compose`` …) stay readable through the wrapper.
    """

    def __init__(self, transform: Callable):
        self.transform = transform.transform if isinstance(transform, RGBFirst) else transform

    def __call__(self, image):
        return self.transform(to_rgb(image) if isinstance(image, Image.Image) else image)

    def __getattr__(self, name: str):
        if name == "transform":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.transform, name)

    def __repr__(self) -> str:
        return f"RGBFirst({self.transform!r})"


class Encoder:
    """What ``load_encoder`` returns: an image model (and maybe a text tower) with its preprocessing.

    ``embed_images`` takes PIL images, file paths, or a tensor — uint8 ``(N, 3, H, W)`` is resized,
    cropped (``crop_pct``) and normalised here, float ``(N, 3, S, S)`` is taken as already preprocessed.
    Subclasses set ``kind`` and implement ``_forward_images`` (and ``_forward_text`` with a text tower).
    """

    kind = "generic"
    has_text = False
    tokenizer = None
    logit_scale: float | None = None  # CLIP-like models: exp of the learned temperature
    logit_bias: float | None = None  # SigLIP-like models only
    no_text_reason: str | None = None  # why a model with a text tower cannot embed text here
    fingerprint: str | None = None  # identifies the weights (set by load_encoder); None = do not cache

    def __init__(self, model: nn.Module, dim: int, image_size: int | tuple[int, int], mean, std,
                 config: dict | None = None, name: str = "", preprocess: Callable | None = None,
                 interpolation: str = "bilinear", crop_pct: float = 1.0):
        self.model = model.eval()
        self.dim = int(dim)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = h if h == w else (h, w)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation, self.crop_pct = interpolation, float(crop_pct)
        self.config = config or {}
        self.name = name
        self.device = torch.device("cpu")
        self.preprocess = RGBFirst(preprocess or T.Compose([
            T.PILToTensor(), T.Resize(min(h, w), antialias=True), T.CenterCrop((h, w)),
            T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, dim={self.dim}, "
                f"image_size={self.image_size}, has_text={self.has_text})")

    def to(self, device: str | torch.device) -> "Encoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------ images
    def _load(self, item: ImageLike) -> torch.Tensor:
        if isinstance(item, Image.Image):
            return self.preprocess(item)  # RGBFirst: to_rgb, then the family's transform
        if isinstance(item, (str, Path)):
            try:
                return self.preprocess(open_image(str(item), str(item)))
            except BadImage as e:
                raise BadImage(f"cannot embed {e}") from None
        raise TypeError(f"expected a PIL image, a path or a tensor, got {type(item).__name__}")

    def _tensor_preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` → ``(B, 3, S, S)`` normalised, as close to ``preprocess`` as tensors allow."""
        if self.crop_pct == 1.0:
            return eval_transform(x, self.image_size, self.mean, self.std)
        h, w = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
        mode = InterpolationMode(self.interpolation if self.interpolation in ("bicubic", "nearest") else "bilinear")
        x = TF.resize(to_float(x), math.floor(min(h, w) / self.crop_pct), interpolation=mode, antialias=True)
        return normalize(TF.center_crop(x, [h, w]), self.mean, self.std)

    def _as_batches(self, images, batch_size: int) -> Iterable[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images[None]
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size]
                if x.dtype == torch.uint8:
                    x = self._tensor_preprocess(x)
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
        return self.model(x)  # (B, dim)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def embed_text(self, texts: Sequence[str] | str, batch_size: int = 256, normalize: bool = False,
                   progress: bool | None = None) -> torch.Tensor:
        """``(N, dim)`` float32 text features on CPU, in the order given.

        Texts are batched by length (shortest first) so a batch pads to similar lengths; towers that
        support it (open_clip's CLIP) then run only up to the batch's longest sequence.
        """
        if not self.has_text:
            why = self.no_text_reason or ("has no text tower: embed_text needs an image–text model (CLIP, SigLIP: "
                                          "an open_clip or transformers folder, open_clip:ARCH/TAG)")
            raise UnsupportedError(f"{self.name or 'this encoder'} ({self.kind}) {why}")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"embed_text takes strings, got {bad[0]}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        show = progress if progress is not None else len(texts) > 8 * batch_size
        with tqdm(total=len(texts), desc="embedding texts", unit="text", disable=not show, leave=False) as bar:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                out[idx] = self._forward_text([texts[j] for j in idx]).float().cpu()  # (b, dim)
                bar.update(len(idx))
        return F.normalize(out, dim=-1) if normalize else out

    def _forward_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def pickle_error(what: str, pickles: list[str], target: str) -> LoadError:
    return LoadError(
        f"{what}: the weights are pickle files only ({', '.join(pickles)}); sslhub loads safetensors only, because "
        "unpickling a file can run arbitrary code. If you trust this checkpoint, convert it once: "
        f"state = torch.load('{pickles[0]}', map_location='cpu', weights_only=True) (take state['state_dict'] if "
        f"it is nested), then safetensors.torch.save_file(state, '{target}') in the same folder; for a "
        "transformers folder, Model.from_pretrained(folder).save_pretrained(folder) writes safetensors.")
