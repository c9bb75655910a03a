"""Decoding to fixed-size uint8 tensors, and the per-step batch plan shared by all processes.

Images are decoded once to ``(3, S, S)`` uint8 (short side resized to S, centre crop) — every
random augmentation then runs on whole batches (``sslhub.data.augment``).  Unreadable images
(truncated, zero bytes, not an image) are *skipped and counted*: the log names each one — and so
are decompression bombs: an image declaring more than ``Image.MAX_IMAGE_PIXELS`` pixels is refused
from its header, before any pixel is decoded.
CMYK, grayscale and 16-bit images are converted to 8-bit RGB; transparency (RGBA, LA, PA, a palette
image's transparent entries, a grey or RGB PNG's transparent colour) is composited on white, and a
palette (P) image takes its palette's colours.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sslhub.data.sources import DataError, Sample, Source, captions_of
from sslhub.errors import InputError, SslhubError

log = logging.getLogger("sslhub.data")
# Decompression-bomb guard: 20 MP photos are fine. PIL itself only warns between this and twice it (and
# decodes, allocating gigabytes); open_image refuses anything above it, before decoding.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(SslhubError, ValueError):
    pass


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (16-bit scaled, alpha composited on white, CMYK converted)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    palette_alpha = img.mode == "P" and getattr(img.palette, "mode", "RGB") == "RGBA"
    if img.mode in ("P", "L", "RGB", "1") and ("transparency" in img.info or palette_alpha):
        img = img.convert("RGBA")  # transparent palette entries / the PNG's transparent colour → alpha
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def check_pixels(img: Image.Image, name: str = "image") -> None:
    """Refuse an image whose header declares more than ``Image.MAX_IMAGE_PIXELS`` pixels (read at call time).

    PIL raises ``DecompressionBombError`` only above twice the limit; between the two it warns and decodes.
    """
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise BadImage(f"{name}: declares {w}x{h} pixels ({w * h / 1e6:.0f} MP), over the {limit / 1e6:.0f} MP "
                       "limit: a decompression bomb or a mis-sized image, not decoded (raise "
                       "PIL.Image.MAX_IMAGE_PIXELS to accept it)")


def open_image(src: bytes | str, name: str = "image") -> Image.Image:
    """Decode fully (so truncation is caught here) and convert to RGB, or raise :class:`BadImage`."""
    try:
        if isinstance(src, (bytes, bytearray)):
            if len(src) == 0:
                raise BadImage(f"{name}: empty file (0 bytes)")
            img = Image.open(io.BytesIO(src))
        else:
            if os.path.getsize(src) == 0:
                raise BadImage(f"{name}: empty file (0 bytes)")
            img = Image.open(src)
        check_pixels(img, name)
        img.load()
        return to_rgb(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image file") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"{name}: a decompression bomb, not decoded ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name}: cannot decode ({e})") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None if s > 0.5 else 2.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def decode(sample: Sample, size: int) -> torch.Tensor:
    img = open_image(sample.data if sample.data is not None else sample.path, sample.key)
    return pil_to_uint8(resize_center_crop(img, size))


class ImageDataset(Dataset):
    """``ds[i] → (uint8 (3, S, S) or None if unreadable, label, i, error or None)``."""

    def __init__(self, source: Source, size: int):
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source.samples)

    def __getitem__(self, i: int):
        s = self.source.samples[i]
        try:
            return decode(s, self.size), s.label, i, None
        except BadImage as e:
            return None, s.label, i, str(e)


def collate_skip(items):
    """Stack the readable items; report the unreadable ones."""
    ok = [it for it in items if it[0] is not None]
    errors = [it[3] for it in items if it[0] is None]
    if ok:
        images = torch.stack([it[0] for it in ok])
        labels = torch.tensor([it[1] for it in ok], dtype=torch.long)
        index = torch.tensor([it[2] for it in ok], dtype=torch.long)
    else:
        images, labels, index = None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return images, labels, index, errors


@dataclass
class DecodedImages:
    """A whole source decoded into memory: ``images (N, 3, S, S) uint8``, ``labels (N,)``, the captions."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    classes: list[str] | None
    skipped: list[str]
    texts: list[list[str]] | None = None  # the non-empty captions of each image (image–text data)

    def __len__(self) -> int:
        return self.images.shape[0]


def decode_all(source: Source, size: int, num_workers: int = 0, progress: bool = True,
               desc: str = "decoding") -> DecodedImages:
    """Decode every sample of ``source`` at ``size`` px (in ``num_workers`` processes)."""
    ds = ImageDataset(source, size)
    loader = DataLoader(ds, batch_size=256, num_workers=num_workers, collate_fn=collate_skip,
                        persistent_workers=False)
    images = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    keep = torch.zeros(len(ds), dtype=torch.bool)
    skipped = list(source.skipped)
    with tqdm(total=len(ds), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch, lab, idx, errors in loader:
            if batch is not None:
                images[idx], labels[idx], keep[idx] = batch, lab, True
            skipped.extend(errors)
            bar.update(len(idx) + len(errors))
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; … {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d unreadable sample(s): %s", source.spec, len(skipped), shown)
    if not keep.any():
        raise DataError(f"{source.spec}: none of the {len(ds)} images could be decoded (first: {skipped[0]})")
    kept = [s for s, k in zip(source.samples, keep.tolist()) if k]
    texts = [captions_of(s) for s in kept]
    if not keep.all():  # else no copy: at 1M CIFAR images the copy alone was 2.9 GB
        images, labels = images[keep], labels[keep]
    return DecodedImages(images, labels, [s.key for s in kept], source.classes, skipped,
                         texts if any(texts) else None)


@dataclass
class BatchPlan:
    """Which samples each process sees at each step: one seeded permutation per epoch.

    The global batch ``perm[step * G : (step + 1) * G]`` is cut into ``world`` equal slices, so the
    union over processes is the same whatever the number of processes, and a resumed run sees
    exactly the batches an uninterrupted one would.
    """

    n: int
    global_batch: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.global_batch % self.world:
            raise InputError(f"data.batch_size={self.global_batch} is not divisible by {self.world} processes")
        if self.n < self.global_batch:
            raise DataError(f"{self.n} images is fewer than one batch of {self.global_batch}: "
                            "lower data.batch_size or add data")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:  # one permutation per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        perm = self._perm
        local = self.global_batch // self.world
        start = i * self.global_batch + self.rank * local
        return perm[start : start + local]
