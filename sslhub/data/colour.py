"""CIE L*a*b* colour, batched in torch: the shared piece of the colorization family (Zhang, Isola, Efros 2016:
predict ab from L; split-brain autoencoders, 2017: L → ab and ab → L).

Conventions, those of ``skimage.color.rgb2lab`` (the reference the tests compare against): sRGB in ``[0, 1]``
(IEC 61966-2-1 transfer curve), the sRGB → XYZ matrix of Rec. 709 primaries, the D65 white point (2° observer),
and CIE 1976 L*a*b* with L in ``[0, 100]`` and a, b roughly in ``[−128, 127]`` (sRGB's gamut spans about
a ∈ [−86, 98], b ∈ [−108, 95]).  Every function takes ``(…, 3, H, W)`` tensors (channels before the pixels, as
the rest of sslhub) and computes in float32 or float64, never under autocast.
"""
from __future__ import annotations

import torch
from torch import Tensor

# sRGB (linear, Rec. 709 primaries) → CIE XYZ, and the D65 reference white (skimage's "D65", "2")
RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
D65 = (0.95047, 1.0, 1.08883)
_EPS = 0.008856  # (6/29)³: below it the cube root is replaced by a line (CIE 1976)
_KAPPA = 7.787  # 1 / (3 · (6/29)²), the slope of that line
_DELTA = 6 / 29

# Scales that bring L and ab near [−1, 1] for a network's input and output (Zhang et al. 2016 centre L at 50)
L_CENTRE, L_SCALE, AB_SCALE = 50.0, 50.0, 110.0


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _matrix(rows, like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _mix(m: Tensor, x: Tensor) -> Tensor:
    """``m (3, 3)`` applied to the channel axis of ``x (…, 3, H, W)``."""
    return torch.einsum("ij,...jhw->...ihw", m, x)


def srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x > 0.04045, ((x + 0.055) / 1.055).clamp_min(0) ** 2.4, x / 12.92)


def linear_to_srgb(x: Tensor) -> Tensor:
    return torch.where(x > 0.0031308, 1.055 * x.clamp_min(0) ** (1 / 2.4) - 0.055, 12.92 * x)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in ``[0, 1]`` ``(…, 3, H, W)`` → L*a*b* ``(…, 3, H, W)`` (L in [0, 100])."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab needs 3 channels before the pixels, got shape {tuple(rgb.shape)}")
    with torch.autocast(rgb.device.type, enabled=False):
        x = _float(rgb)
        xyz = _mix(_matrix(RGB_TO_XYZ, x), srgb_to_linear(x))
        xyz = xyz / _matrix(D65, x).view(3, 1, 1)
        f = torch.where(xyz > _EPS, xyz.clamp_min(_EPS) ** (1 / 3), _KAPPA * xyz + 16 / 116)
        fx, fy, fz = f.unbind(-3)
        return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: Tensor, clip: bool = True) -> Tensor:
    """L*a*b* ``(…, 3, H, W)`` → sRGB ``(…, 3, H, W)``, clipped to ``[0, 1]`` unless ``clip=False`` (colours
    outside sRGB's gamut then fall outside it)."""
    if lab.shape[-3] != 3:
        raise ValueError(f"lab_to_rgb needs 3 channels before the pixels, got shape {tuple(lab.shape)}")
    with torch.autocast(lab.device.type, enabled=False):
        x = _float(lab)
        l, a, b = x.unbind(-3)
        fy = (l + 16) / 116
        # f_z below 0 (far outside the gamut) is clipped to 0, as skimage's lab2xyz does
        f = torch.stack([fy + a / 500, fy, (fy - b / 200).clamp_min(0)], dim=-3)
        xyz = torch.where(f > _DELTA, f ** 3, (f - 16 / 116) / _KAPPA) * _matrix(D65, x).view(3, 1, 1)
        rgb = linear_to_srgb(_mix(torch.linalg.inv(_matrix(RGB_TO_XYZ, x)), xyz))
        return rgb.clamp(0, 1) if clip else rgb


def split_lab(rgb: Tensor) -> tuple[Tensor, Tensor]:
    """sRGB ``(…, 3, H, W)`` in ``[0, 1]`` → ``(L, ab)`` scaled for a network: ``(L − 50) / 50`` ``(…, 1, H, W)`` in
    [−1, 1] and ``ab / 110`` ``(…, 2, H, W)`` within about [−1, 1]."""
    lab = rgb_to_lab(rgb)
    return (lab[..., :1, :, :] - L_CENTRE) / L_SCALE, lab[..., 1:, :, :] / AB_SCALE


def join_lab(l: Tensor, ab: Tensor, clip: bool = True) -> Tensor:
    """The inverse of :func:`split_lab`: scaled ``L (…, 1, H, W)`` and ``ab (…, 2, H, W)`` → sRGB in ``[0, 1]``."""
    return lab_to_rgb(torch.cat([l * L_SCALE + L_CENTRE, ab * AB_SCALE], dim=-3), clip=clip)


# ----------------------------------------------------------------------------- quantised ab (Zhang et al. 2016 §2.1)
AB_GRID = 10.0  # bin side in ab units (the paper: 10)


def gamut_bins(grid: float = AB_GRID, steps: int = 101) -> Tensor:
    """Centres ``(Q, 2)`` of the ab bins (side ``grid``, centres on multiples of it) that some sRGB colour falls in:
    the sRGB cube sampled at ``steps`` levels a channel (101³ colours), each colour's ab rounded to its bin, the bins
    hit kept, sorted by (a, b).  The paper's Q = 313 counts the bins seen in ImageNet; sRGB's whole gamut at grid 10
    gives 261 (the tests count them, and check that every sRGB colour lies within half a bin's diagonal of one)."""
    v = torch.linspace(0, 1, steps, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, 1, -1)  # (3, 1, steps³)
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1).T  # (steps³, 2)
    idx = torch.unique(torch.round(ab / grid).long(), dim=0)  # sorted rows
    return (idx.double() * grid).float()


def soft_encode(ab: Tensor, bins: Tensor, k: int = 5, sigma: float = 5.0) -> Tensor:
    """Zhang et al. §2.1's soft targets: ab values ``(N, 2)`` (unscaled Lab units) → ``(N, Q)`` distributions over the
    bins, nonzero on the ``k`` nearest bins, weighted by a Gaussian of their distance (σ = 5), summing to 1."""
    d2 = torch.cdist(ab.double(), bins.to(ab.device).double()) ** 2  # (N, Q)
    near, idx = d2.topk(k, dim=1, largest=False)
    w = torch.softmax(-near / (2 * sigma**2), dim=1)  # = exp(−d²/2σ²) / Σ over the k nearest
    return torch.zeros_like(d2).scatter_(1, idx, w).to(ab.dtype)


def rebalancing_weights(prior: Tensor, bins: Tensor, lam: float = 0.5, sigma: float = 5.0) -> Tensor:
    """Zhang et al. §2.2's class rebalancing: from the empirical bin frequencies ``prior (Q,)`` (any scale), smoothed by
    a Gaussian of σ over the bins' ab distances (``sigma=0``: not smoothed), ``w ∝ ((1 − λ)·p̃ + λ/Q)^−1`` normalised so
    that ``Σ p̃·w = 1`` (rare colours count more; λ = 1/2 in the paper)."""
    p = prior.double() / prior.double().sum()
    if sigma > 0:
        kernel = torch.exp(-torch.cdist(bins.double(), bins.double()) ** 2 / (2 * sigma**2))
        p = kernel @ p
        p = p / p.sum()
    w = 1.0 / ((1 - lam) * p + lam / p.numel())
    return (w / (p * w).sum()).float()


def annealed_mean(probs: Tensor, bins: Tensor, temperature: float = 0.38, dim: int = 1) -> Tensor:
    """Zhang et al. §2.3's decoding: ``H(Z) = E[f_T(Z)]`` with ``f_T(z) ∝ exp(log z / T)`` (T = 0.38; T = 1: the mean,
    T → 0: the mode).  ``probs``: distributions over the ``Q`` bins along ``dim`` → ab values, with the bins' axis
    replaced by 2 (a, b)."""
    logits = torch.log(probs.clamp_min(1e-12)) / temperature
    z = torch.softmax(logits, dim=dim)
    return torch.tensordot(z.movedim(dim, -1), bins.to(z), dims=([-1], [0])).movedim(-1, dim)
