"""Batched image augmentations with per-sample random parameters.

Every op here takes a whole batch ``(B, 3, H, W)`` of float images in ``[0, 1]`` and draws an
independent set of parameters for each sample, so one call replaces ``B`` PIL/torchvision calls.
This is what makes contrastive training (two views per image) fast on CPU.

Randomness comes *only* from the explicit ``torch.Generator`` passed as ``g``; the global RNG is
never touched, so the same seed always gives bit-identical views. Each op draws all of its random
numbers for all ``B`` samples in a fixed order (whether or not a sample is selected), so toggling
one knob does not shift the random stream of the other samples.

The default pipeline (:class:`ViewConfig`) follows SimCLR (Chen et al. 2020,
https://arxiv.org/abs/2002.05709, Appendix A): random resized crop + flip, colour jitter with
strength 0.5 applied with p=0.8, random grayscale with p=0.2, optional Gaussian blur with kernel
10% of the image size. BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733, Table 6) uses
the same ops with asymmetric blur / solarize probabilities, which ``ViewConfig`` can express.

Deviations from torchvision (documented where they happen):
  * ``random_resized_crop`` does not antialias when downscaling (plain bilinear sampling);
  * ``color_jitter`` draws ONE random op order per batch, not one per image;
  * grayscale uses the ITU-R 601-2 / PIL weights 0.299, 0.587, 0.114 (torchvision: 0.2989).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sslhub.config import check

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma weights (as PIL's "L" mode)


# ----------------------------------------------------------------------------- helpers
def _need(g: torch.Generator | None) -> torch.Generator:
    if g is None:
        raise ValueError("pass an explicit torch.Generator `g` (the global RNG is never used)")
    return g


def _rand(g: torch.Generator | None, *shape: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 numbers drawn from ``g`` (on g's device), moved to ``device``."""
    return torch.rand(*shape, generator=_need(g), device=g.device).to(device)


def _uniform(g, n: int, lo: float, hi: float, device) -> Tensor:
    return lo + (hi - lo) * _rand(g, n, device=device)  # (n,)


def _apply_where(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``x`` with ``fn(x[idx], idx)`` at the samples where ``mask`` (B,) is True; only those are
    computed, the others are returned unchanged."""
    if bool(mask.all()):
        return fn(x, torch.arange(x.shape[0], device=x.device))
    idx = mask.nonzero().squeeze(1)  # (n,)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = fn(x[idx], idx)
    return out


def _view(f: Tensor) -> Tensor:
    return f.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


# ----------------------------------------------------------------------------- conversion
def to_float(x: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in any memory format (e.g. channels-last) -> contiguous float32 [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255.0)
    else:
        x = x.to(torch.float32)
    return x.contiguous(memory_format=torch.contiguous_format)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Per-channel ``(x - mean) / std`` for ``x`` of shape (B, C, H, W)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- geometry
def sample_crop_params(
    n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
    g: torch.Generator | None = None, tries: int = 10, device=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample crop boxes ``(top, left, h, w)``, each a LongTensor (n,).

    Vectorised version of ``torchvision.transforms.RandomResizedCrop.get_params``: for each sample
    draw ``tries`` candidates (area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio``), keep the first one that fits in the image, and fall back to torchvision's central
    crop (clipped to ``ratio``) when none fits. Top/left are uniform over the valid positions.
    """
    device = device if device is not None else torch.device("cpu")
    area = height * width
    frac = scale[0] + (scale[1] - scale[0]) * _rand(g, n, tries, device=device).double()  # (n, T)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand(g, n, tries, device=device).double())
    target = area * frac  # (n, T) target areas in pixels
    w_c = torch.round(torch.sqrt(target * aspect)).long()  # (n, T); round-half-even as python
    h_c = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w_c > 0) & (w_c <= width) & (h_c > 0) & (h_c <= height)  # (n, T)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # (n, 1) index of first valid try
    w = w_c.gather(1, first).squeeze(1)  # (n,)
    h = h_c.gather(1, first).squeeze(1)

    # torchvision's fallback: central crop with the aspect ratio clipped to `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    found = ok.any(dim=1)  # (n,)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))

    u_top, u_left = _rand(g, n, device=device), _rand(g, n, device=device)
    top = torch.minimum((u_top * (height - h + 1)).long(), height - h)  # randint(0, H - h + 1)
    left = torch.minimum((u_left * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return top, left, h, w


def crop_resize(
    x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor,
    size: int | tuple[int, int], flip: Tensor | None = None,
) -> Tensor:
    """Crop box ``[top:top+h, left:left+w]`` of each sample, resize to ``size``, optionally flip.

    ONE ``affine_grid`` + ``grid_sample`` (bilinear, ``align_corners=False``) for the whole batch.
    The sampling grid is clamped to the centres of the box's border pixels, which reproduces
    ``F.interpolate(crop, size, mode="bilinear", antialias=False)`` exactly, i.e. torchvision's
    ``resized_crop(..., antialias=False)``. No antialiasing when downscaling (torchvision's default
    ``antialias=True`` low-pass filters first); on small images such as CIFAR this rarely matters.

    x: (B, C, H, W); top/left/h/w: (B,) ints; flip: optional (B,) bool.
    """
    B, _, H, W = x.shape
    oh, ow = (size, size) if isinstance(size, int) else tuple(size)
    top, left, h, w = (t.to(device=x.device, dtype=x.dtype) for t in (top, left, h, w))
    sx = w / W  # (B,) output x in [-1, 1] -> input normalised x
    if flip is not None:
        sx = torch.where(flip.to(x.device), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, (2 * left + w) / W - 1,
                         zero, h / H, (2 * top + h) / H - 1], dim=-1).reshape(B, 2, 3)
    grid = F.affine_grid(theta, [B, x.shape[1], oh, ow], align_corners=False)  # (B, oh, ow, 2)
    # clamp to the box's first/last pixel centres (matters only when upsampling)
    lo = torch.stack([(2 * left + 1) / W - 1, (2 * top + 1) / H - 1], dim=-1)  # (B, 2)
    hi = torch.stack([(2 * (left + w) - 1) / W - 1, (2 * (top + h) - 1) / H - 1], dim=-1)
    grid = torch.maximum(torch.minimum(grid, hi[:, None, None]), lo[:, None, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    x: Tensor, size: int | tuple[int, int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
    g: torch.Generator | None = None, hflip_p: float = 0.0,
) -> Tensor:
    """Per-sample RandomResizedCrop (+ optional horizontal flip), SimCLR's main augmentation.

    Boxes are sampled like torchvision (:func:`sample_crop_params`); resampling is bilinear
    without antialiasing (see :func:`crop_resize`). (B, 3, H, W) -> (B, 3, *size).
    """
    B, _, H, W = x.shape
    top, left, h, w = sample_crop_params(B, H, W, scale, ratio, g, device=x.device)
    flip = _rand(g, B, device=x.device) < hflip_p if hflip_p > 0 else None  # (B,)
    return crop_resize(x, top, left, h, w, size, flip)


def hflip(x: Tensor, p: float = 0.5, g: torch.Generator | None = None) -> Tensor:
    """Flip each sample left-right with probability ``p``."""
    mask = _rand(g, x.shape[0], device=x.device) < p  # (B,)
    return torch.where(_view(mask), x.flip(-1), x)


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate sample i by ``k[i] * 90`` degrees counter-clockwise, like ``torch.rot90(x[i], k[i])``.

    Vectorised by grouping samples with the same ``k mod 4`` (odd k needs square images).
    """
    k = k.to(x.device).long() % 4  # (B,)
    if x.shape[-1] != x.shape[-2] and bool((k % 2 == 1).any()):
        raise ValueError("rotate90 by an odd multiple of 90 degrees needs square images")
    out = torch.empty_like(x)
    for r in range(4):
        idx = (k == r).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out


# ----------------------------------------------------------------------------- colour
def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with ITU-R 601-2 weights."""
    r, g, b = x.unbind(dim=-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """``f * a + (1 - f) * b`` clamped to [0, 1], with per-sample f (B,) (torchvision's _blend)."""
    f = _view(f).to(a.dtype)
    return (f * a + (1 - f) * b).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """Scale intensities by per-sample factor f (B,); blend with black."""
    return (x * _view(f).to(x.dtype)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the per-sample mean of the grayscale image, factor f (B,)."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """Blend with the grayscale image, factor f (B,) (0 = gray, 1 = unchanged)."""
    return _blend(x, rgb_to_grayscale(x), f)


def _frac(t: Tensor) -> Tensor:
    return t - torch.floor(t)  # t mod 1 (much faster than torch.remainder on CPU)


def _hue_sextant(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RGB (B, 3, H, W) -> hue in sextants (6 = a turn), max, chroma = max - min; each (B, H, W)."""
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)  # (B, H, W)
    delta = maxc - minc
    d = delta.clamp_min(1e-12)  # gray pixels: hue is arbitrary (0 here), chroma 0 kills it
    h = torch.where(maxc == r, (g - b) / d,
                    torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    return h, maxc, delta


def _from_hue_sextant(h6: Tensor, v: Tensor, chroma: Tensor) -> Tensor:
    """c_n = v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1 for R, G, B"""
    n = torch.tensor([5.0, 3.0, 1.0], dtype=v.dtype, device=v.device).reshape(3, 1, 1)
    k = 6.0 * _frac((n + h6.unsqueeze(-3)) / 6.0)  # (B, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (v.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp).clamp_(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, all channels in [0, 1] (hue as a fraction of a turn)."""
    h6, v, chroma = _hue_sextant(x)
    s = chroma / torch.where(chroma == 0, torch.ones_like(v), v)
    return torch.stack([_frac(h6 / 6.0), s, v], dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (the 'alternative' HSV->RGB formula, no branches)."""
    h, s, v = x.unbind(dim=-3)
    return _from_hue_sextant(6.0 * h, v, v * s)


def adjust_hue(x: Tensor, h: Tensor) -> Tensor:
    """Rotate the hue by per-sample shift h (B,) in [-0.5, 0.5] (fraction of a turn).

    Same result as RGB -> HSV -> shift -> RGB (torchvision), but value and chroma are kept as
    they are, so saturation never has to be computed.
    """
    h6, v, chroma = _hue_sextant(x)  # (B, H, W) each
    return _from_hue_sextant(h6 + 6.0 * h.to(x.dtype).reshape(-1, 1, 1), v, chroma)


def color_jitter(
    x: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
    hue: float = 0.1, p: float = 0.8, g: torch.Generator | None = None,
) -> Tensor:
    """Per-sample ColorJitter applied with probability ``p`` per sample (SimCLR: strength s=0.5 ->
    0.8s, 0.8s, 0.8s, 0.2s with p=0.8). Factors as torchvision: brightness/contrast/saturation
    uniform in ``[max(0, 1 - v), 1 + v]``, hue shift uniform in ``[-hue, hue]``; each op clamps to
    [0, 1]. Deviation: torchvision draws a random op order per image; here ONE random order is
    drawn (from ``g``) per batch. Unselected samples are returned unchanged.
    """
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}")
    B, dev = x.shape[0], x.device
    order = torch.randperm(4, generator=_need(g), device=g.device).tolist()  # one order per batch
    mask = _rand(g, B, device=dev) < p  # (B,)
    fb = _uniform(g, B, max(0.0, 1 - brightness), 1 + brightness, dev)  # (B,)
    fc = _uniform(g, B, max(0.0, 1 - contrast), 1 + contrast, dev)
    fs = _uniform(g, B, max(0.0, 1 - saturation), 1 + saturation, dev)
    fh = _uniform(g, B, -hue, hue, dev)
    ops = [(brightness, adjust_brightness, fb), (contrast, adjust_contrast, fc),
           (saturation, adjust_saturation, fs), (hue, adjust_hue, fh)]

    def jitter(y: Tensor, idx: Tensor) -> Tensor:
        for i in order:
            strength, fn, f = ops[i]
            if strength > 0:
                y = fn(y, f[idx])
        return y

    return _apply_where(x, mask, jitter)


def random_grayscale(x: Tensor, p: float = 0.2, g: torch.Generator | None = None) -> Tensor:
    """Convert each sample to 3-channel grayscale with probability ``p``."""
    mask = _rand(g, x.shape[0], device=x.device) < p  # (B,)
    return torch.where(_view(mask), rgb_to_grayscale(x).expand_as(x), x)


# ----------------------------------------------------------------------------- blur / solarize
def gaussian_kernel1d(kernel_size: int, sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussian taps (B, K) for per-sample sigma (B,) (same taps as torchvision)."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=sigma.dtype, device=sigma.device)  # (K,)
    return torch.softmax(-0.5 * (t / sigma[:, None]) ** 2, dim=1)  # (B, K)


def blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with per-sample sigma (B,), reflect padding.

    One depthwise conv per direction over the whole batch: the batch is viewed as a single image
    with B*C channels, and every channel gets its sample's kernel (groups = B*C).
    """
    if kernel_size % 2 == 0:
        kernel_size += 1
    B, C, H, W = x.shape
    if kernel_size == 1 or B == 0:
        return x
    r = kernel_size // 2
    k = gaussian_kernel1d(kernel_size, sigma.to(device=x.device, dtype=x.dtype))  # (B, K)
    k = k.repeat_interleave(C, dim=0)  # (B*C, K)
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def gaussian_blur(
    x: Tensor, kernel_size: int, sigma=(0.1, 2.0), p: float = 0.5, g: torch.Generator | None = None,
) -> Tensor:
    """Per-sample Gaussian blur with sigma uniform in ``sigma``, applied with probability ``p``
    (SimCLR: p=0.5, kernel 10% of the image side; BYOL: p=1.0 / 0.1 for the two views)."""
    B = x.shape[0]
    mask = _rand(g, B, device=x.device) < p  # (B,)
    s = _uniform(g, B, sigma[0], sigma[1], x.device)  # (B,)
    return _apply_where(x, mask, lambda y, idx: blur(y, kernel_size, s[idx]))


def solarize(x: Tensor, threshold: float = 0.5, p: float = 0.0,
             g: torch.Generator | None = None) -> Tensor:
    """Invert pixels ``>= threshold`` of each sample with probability ``p`` (BYOL: p=0 / 0.2)."""
    mask = _rand(g, x.shape[0], device=x.device) < p  # (B,)
    return torch.where(_view(mask) & (x >= threshold), 1.0 - x, x)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class ViewConfig:
    """One augmented view; defaults are SimCLR's CIFAR-10 settings (no blur on 32x32 images)."""
    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)  # crop area fraction range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect-ratio range
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel_frac: float = 0.1  # kernel = 10% of the image side, as SimCLR
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    # Methods replace mean/std by the encoder's own (Method.view_pipeline), so train and serve agree.
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

    def __post_init__(self):
        check(self.size >= 1, "size", "the view's side in pixels must be a positive integer")
        lo, hi = self.scale
        check(0 < lo <= hi <= 1, "scale", "the crop's area fraction (lo, hi) needs 0 < lo <= hi <= 1")
        lo, hi = self.ratio
        check(0 < lo <= hi, "ratio", "the crop's aspect-ratio range (lo, hi) needs 0 < lo <= hi")
        for name in ("hflip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            check(0 <= getattr(self, name) <= 1, name, "a probability must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            check(getattr(self, name) >= 0, name, "a jitter strength must be >= 0 (SimCLR: 0.8 × strength)")
        check(0 <= self.hue <= 0.5, "hue", "the hue shift must be in [0, 0.5] (SimCLR: 0.2 × strength)")
        check(0 <= self.blur_kernel_frac <= 1, "blur_kernel_frac",
              "the blur kernel as a fraction of the side must be in [0, 1] (SimCLR: 0.1)")
        lo, hi = self.blur_sigma
        check(0 < lo <= hi, "blur_sigma", "the blur's sigma range (lo, hi) needs 0 < lo <= hi (SimCLR: 0.1, 2)")
        check(all(s > 0 for s in self.std), "std", "every channel's std must be > 0")

    @property
    def blur_kernel_size(self) -> int:
        k = max(1, int(self.blur_kernel_frac * self.size))
        return k if k % 2 == 1 else k + 1


class BatchAugment(torch.nn.Module):
    """uint8 (B, 3, H, W) -> normalised float32 (B, 3, size, size) view:
    crop+flip -> colour jitter -> grayscale -> blur -> solarize -> normalize (ops with p=0 skipped).

    Always runs in float32, even inside an autocast region.
    """

    def __init__(self, cfg: ViewConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32), persistent=False)

    def forward(self, images_uint8: Tensor, g: torch.Generator) -> Tensor:
        c = self.cfg
        with torch.autocast(images_uint8.device.type, enabled=False):
            x = to_float(images_uint8)  # (B, 3, H, W)
            x = random_resized_crop(x, c.size, c.scale, c.ratio, g, c.hflip_p)  # (B, 3, S, S)
            if c.jitter_p > 0:
                x = color_jitter(x, c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p, g)
            if c.gray_p > 0:
                x = random_grayscale(x, c.gray_p, g)
            if c.blur_p > 0:
                x = gaussian_blur(x, c.blur_kernel_size, c.blur_sigma, c.blur_p, g)
            if c.solarize_p > 0:
                x = solarize(x, 0.5, c.solarize_p, g)
            return normalize(x, self.mean, self.std)


def eval_transform(images_uint8: Tensor, size: int | tuple[int, int],
                   mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Deterministic eval view: bilinear resize with antialiasing if needed, then normalize."""
    oh, ow = (size, size) if isinstance(size, int) else tuple(size)
    with torch.autocast(images_uint8.device.type, enabled=False):
        x = to_float(images_uint8)  # (B, 3, H, W)
        if x.shape[-2:] != (oh, ow):
            x = F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False, antialias=True)
        return normalize(x, mean, std)
