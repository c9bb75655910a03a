"""CIE L*a*b* (``sslhub.data.colour``) against scikit-image's ``rgb2lab`` / ``lab2rgb`` and the CIE's own values."""
import math

import numpy as np
import pytest
import torch

from sslhub.data.colour import (
    annealed_mean,
    gamut_bins,
    join_lab,
    lab_to_rgb,
    rebalancing_weights,
    rgb_to_lab,
    soft_encode,
    split_lab,
)

skimage_color = pytest.importorskip("skimage.color")  # a test dependency (pyproject's [test] extra)


def random_rgb(n=4, h=9, w=7, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rgb_to_lab_matches_skimage(dtype):
    rgb = random_rgb(dtype=dtype)
    # the dark end, where the cube root becomes a line, and the corners of the cube
    rgb[0, :, 0, :] = torch.linspace(0, 0.05, 7, dtype=dtype)
    rgb[1, :, :2, :2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    got = rgb_to_lab(rgb).permute(0, 2, 3, 1).double().numpy()
    want = np.stack([skimage_color.rgb2lab(img) for img in to_hwc(rgb)])
    tol = 2e-3 if dtype == torch.float32 else 1e-6
    assert np.abs(got - want).max() < tol


def test_known_colours():
    """CIE values of sRGB white, black and the primaries (D65)."""
    rgb = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64).T.reshape(1, 3, 1, 5)
    lab = rgb_to_lab(rgb)[0, :, 0].T
    want = torch.tensor([[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86]],
                        dtype=torch.float64)
    assert torch.allclose(lab, want, atol=0.01)


def test_lab_to_rgb_inverts_and_matches_skimage():
    rgb = random_rgb(seed=1, dtype=torch.float64)
    lab = rgb_to_lab(rgb)
    assert torch.allclose(lab_to_rgb(lab), rgb, atol=1e-9)
    # an arbitrary Lab grid (out-of-gamut colours included): the clipped sRGB of skimage
    g = torch.Generator().manual_seed(2)
    lab = torch.stack([torch.rand(2, 6, 6, generator=g) * 100, torch.rand(2, 6, 6, generator=g) * 160 - 80,
                       torch.rand(2, 6, 6, generator=g) * 160 - 80], 1).double()
    with pytest.warns(UserWarning, match="negative Z"):  # skimage clips a negative Z to 0, and so does lab_to_rgb
        want = np.stack([skimage_color.lab2rgb(img) for img in to_hwc(lab)])
    got = lab_to_rgb(lab).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - want).max() < 1e-6


def test_split_and_join_scale_for_a_network_and_invert():
    rgb = random_rgb(seed=3)
    l, ab = split_lab(rgb)
    assert l.shape == (4, 1, 9, 7) and ab.shape == (4, 2, 9, 7)
    assert l.min() >= -1 and l.max() <= 1 and ab.abs().max() <= 1.01
    assert torch.allclose(join_lab(l, ab), rgb, atol=1e-4)
    gray = torch.full((1, 3, 2, 2), 0.5)
    assert split_lab(gray)[1].abs().max() < 1e-4  # gray has no colour (D65 vs the matrix's white: < 0.01 in ab)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_lab(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="3 channels"):
        lab_to_rgb(torch.rand(1, 2, 4, 4))


# ----------------------------------------------------------------------------- quantised ab (Zhang et al. 2016)
@pytest.fixture(scope="module")
def bins():
    return gamut_bins()


def test_gamut_bins_cover_every_srgb_colour(bins):
    assert bins.shape == (261, 2)  # sRGB's gamut at grid 10 (the paper's 313: the bins seen in ImageNet)
    assert torch.equal(bins, (bins / 10).round() * 10)  # centres on multiples of 10
    rgb = random_rgb(n=2, h=100, w=100, seed=4, dtype=torch.float64)
    ab = rgb_to_lab(rgb)[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)
    nearest = torch.cdist(ab, bins.double()).min(1).values
    assert nearest.max() <= 5 * math.sqrt(2) + 1e-6  # inside its bin: half a bin's diagonal at most


def test_soft_encoding_is_a_gaussian_over_the_5_nearest_bins(bins):
    ab = torch.tensor([[12.3, -40.7], [0.0, 0.0], [30.0, 20.0]])
    z = soft_encode(ab, bins)
    assert z.shape == (3, 261) and torch.allclose(z.sum(1), torch.ones(3))
    assert ((z > 0).sum(1) == 5).all()
    # the first row by hand: the 5 closest centres, weights exp(-d²/50) normalised
    d = [math.dist(ab[0].tolist(), c) for c in bins.tolist()]
    order = sorted(range(len(d)), key=d.__getitem__)[:5]
    w = [math.exp(-d[i] ** 2 / (2 * 5.0**2)) for i in order]
    for i, wi in zip(order, w):
        assert z[0, i].item() == pytest.approx(wi / sum(w), rel=1e-5)
    on = bins.tolist().index([30.0, 20.0])
    assert z[2].argmax().item() == on  # a value on a centre weighs most there


def test_rebalancing_weights_follow_the_paper(bins):
    q = bins.shape[0]
    assert torch.allclose(rebalancing_weights(torch.ones(q), bins, sigma=0), torch.ones(q))  # uniform: all 1
    prior = torch.ones(q)
    prior[0] = q  # one bin holds half the pixels
    p = prior / prior.sum()
    for lam in (0.5, 0.2):  # the paper's λ, and one where (1 − λ) and λ differ
        raw = 1 / ((1 - lam) * p + lam / q)
        assert torch.allclose(rebalancing_weights(prior, bins, lam=lam, sigma=0), raw / (p * raw).sum(), rtol=1e-6)
    w = rebalancing_weights(prior, bins, lam=0.5, sigma=0)
    assert w[0] < 1 < w[1]  # the common colour counts less, the rare ones more
    assert (p * w).sum().item() == pytest.approx(1.0, rel=1e-6)
    smoothed = rebalancing_weights(prior, bins)  # σ = 5: the common bin's neighbours share its mass
    assert (p * smoothed).sum() < 1.5 and smoothed[0] < smoothed[1]


def test_annealed_mean_runs_from_the_mean_to_the_mode(bins):
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(3, bins.shape[0], 2, 2, generator=g) * 3, dim=1)  # (N, Q, H, W)
    mean = annealed_mean(probs, bins, temperature=1.0)
    assert mean.shape == (3, 2, 2, 2)
    assert torch.allclose(mean, torch.einsum("nqhw,qc->nchw", probs, bins), atol=1e-4)
    mode = annealed_mean(probs, bins, temperature=1e-3)
    assert torch.allclose(mode, bins[probs.argmax(1)].permute(0, 3, 1, 2), atol=1e-3)
    t = 0.38  # the paper's: written out for one pixel
    f = probs[0, :, 1, 0] ** (1 / t)
    want = (f / f.sum()) @ bins
    assert torch.allclose(annealed_mean(probs, bins, t)[0, :, 1, 0], want, atol=1e-4)
