"""CIE L*a*b* (``sslhub.data.colour``) against scikit-image's ``rgb2lab`` / ``lab2rgb`` and the CIE's own values."""
import numpy as np
import pytest
import torch

from sslhub.data.colour import join_lab, lab_to_rgb, rgb_to_lab, split_lab

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
