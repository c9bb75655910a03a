"""Tests for sslhub.data.augment: batched ops are checked against torchvision / torch."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from sslhub.data import augment as A


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def imgs():
    return torch.rand(6, 3, 20, 24, generator=gen(123))  # (B, 3, H, W), non-square on purpose


# ----------------------------------------------------------------------------- crop
def test_crop_full_scale_is_identity():
    x = torch.rand(5, 3, 32, 32, generator=gen(1))
    y = A.random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), g=gen(2))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("out", [32, (7, 5)])  # upscaling and downscaling
def test_crop_resize_matches_torchvision(imgs, out):
    top = torch.tensor([3, 0, 5, 10, 0, 12])
    left = torch.tensor([2, 7, 0, 12, 0, 0])
    h = torch.tensor([8, 10, 15, 10, 20, 8])
    w = torch.tensor([9, 17, 6, 12, 24, 24])
    size = [out, out] if isinstance(out, int) else list(out)
    y = A.crop_resize(imgs, top, left, h, w, out)
    assert y.shape == (6, 3, *size)
    for i in range(6):
        ref = TF.resized_crop(imgs[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), size,
                              antialias=False)
        torch.testing.assert_close(y[i], ref, atol=1e-5, rtol=0)


def test_crop_flip_is_torch_flip(imgs):
    B = imgs.shape[0]
    top, left = torch.tensor([1] * B), torch.tensor([3] * B)
    h, w = torch.tensor([12] * B), torch.tensor([15] * B)
    flip = torch.tensor([True, False, True, False, True, True])
    plain = A.crop_resize(imgs, top, left, h, w, 16)
    flipped = A.crop_resize(imgs, top, left, h, w, 16, flip)
    torch.testing.assert_close(flipped[flip], torch.flip(plain[flip], dims=[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[~flip], plain[~flip])


def test_hflip_p1_in_random_resized_crop():
    x = torch.rand(4, 3, 16, 16, generator=gen(3))
    y = A.random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), g=gen(0), hflip_p=1.0)
    torch.testing.assert_close(y, torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)


def test_crop_params_statistics_match_torchvision():
    H, W, n = 40, 60, 20000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = A.sample_crop_params(n, H, W, scale, ratio, g=gen(0))
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= H).all() and (left + w <= W).all())
    frac = (h * w).double() / (H * W)
    # integer rounding moves the area slightly outside the nominal range
    assert frac.min() > scale[0] * 0.8 and frac.max() <= 1.0
    # same distribution as torchvision's get_params (which uses the global RNG; test only)
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(ratio))
                        for _ in range(3000)])
    ref_frac = (ref[:, 2] * ref[:, 3]).double() / (H * W)
    assert abs(frac.mean() - ref_frac.mean()) < 0.02
    assert abs(frac.std() - ref_frac.std()) < 0.02
    log_ar, ref_log_ar = (w / h).double().log(), (ref[:, 3] / ref[:, 2]).double().log()
    assert abs(log_ar.mean() - ref_log_ar.mean()) < 0.02
    # positions are spread over the valid range: mean relative offset ~ 0.5
    rel = (top.double() + 0.5) / (H - h + 1).double()
    assert abs(rel.mean() - 0.5) < 0.02


@pytest.mark.parametrize("H,W,fh,fw", [(10, 30, 10, round(10 * 4 / 3)),
                                       (30, 10, round(10 / (3 / 4)), 10), (12, 12, 12, 12)])
def test_crop_fallback_central(H, W, fh, fw):
    # an impossible scale (> 1) always falls back to torchvision's central crop
    top, left, h, w = A.sample_crop_params(8, H, W, (2.0, 3.0), (3 / 4, 4 / 3), g=gen(0))
    assert bool((h == fh).all() and (w == fw).all())
    assert bool((top == (H - fh) // 2).all() and (left == (W - fw) // 2).all())
    img = torch.zeros(3, H, W)
    torch.manual_seed(0)
    ref = RandomResizedCrop.get_params(img, [2.0, 3.0], [3 / 4, 4 / 3])
    assert ref == ((H - fh) // 2, (W - fw) // 2, fh, fw)


# ----------------------------------------------------------------------------- determinism
def test_determinism_and_per_sample_params():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen(5))
    x = x.repeat(8, 1, 1, 1)
    aug = A.BatchAugment(A.ViewConfig(blur_p=0.5, solarize_p=0.2))
    a, b, c = aug(x, gen(7)), aug(x, gen(7)), aug(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # identical images in one batch get different views
    for i in range(1, 8):
        assert not torch.allclose(a[0], a[i])


def test_global_rng_untouched_and_generator_required():
    x = torch.rand(4, 3, 16, 16, generator=gen(0))
    state = torch.get_rng_state()
    A.BatchAugment(A.ViewConfig(size=16, blur_p=1.0, solarize_p=1.0))(to_u8(x), gen(0))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError):
        A.hflip(x, 0.5, None)


def to_u8(x):
    return (x * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- colour
@pytest.mark.parametrize("name,factors,atol", [
    ("brightness", [0.6, 1.3, 0.9, 1.0, 0.0, 1.4], 1e-6),
    ("contrast", [0.6, 1.3, 0.9, 1.0, 0.0, 1.4], 1e-4),
    ("saturation", [0.6, 1.3, 0.9, 1.0, 0.0, 1.4], 1e-4),
    ("hue", [-0.1, 0.05, 0.5, -0.5, 0.0, 0.23], 1e-4),
])
def test_color_ops_match_torchvision(imgs, name, factors, atol):
    x = imgs.clone()
    x[0, :, :4] = 0.5  # gray pixels (zero saturation) exercise the hue edge case
    x[1, :, :3, :3] = 1.0
    f = torch.tensor(factors)
    ours = getattr(A, f"adjust_{name}")(x, f)
    ref_fn = getattr(TF, f"adjust_{name}")
    for i in range(x.shape[0]):
        torch.testing.assert_close(ours[i], ref_fn(x[i], float(f[i])), atol=atol, rtol=0)


def test_hsv_roundtrip(imgs):
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(imgs)), imgs, atol=1e-5, rtol=0)


def test_color_jitter_p(imgs):
    assert torch.equal(A.color_jitter(imgs, p=0.0, g=gen(0)), imgs)
    y = A.color_jitter(imgs, p=1.0, g=gen(0))
    assert all(not torch.allclose(y[i], imgs[i]) for i in range(len(imgs)))
    assert y.min() >= 0 and y.max() <= 1
    # partial p: the unselected samples are exactly unchanged, the selected ones change
    x = torch.rand(64, 3, 8, 8, generator=gen(1))
    y = A.color_jitter(x, p=0.5, g=gen(2))
    same = (y == x).flatten(1).all(1)
    assert 10 < int(same.sum()) < 54


def test_color_jitter_matches_sequential_ops():
    # re-derive the random draws with the documented order and compare to the per-op functions
    x = torch.rand(5, 3, 8, 8, generator=gen(1))
    g = gen(3)
    order = torch.randperm(4, generator=g).tolist()
    mask = torch.rand(5, generator=g) < 1.0
    fb, fc, fs = (0.6 + 0.8 * torch.rand(5, generator=g) for _ in range(3))
    fh = -0.1 + 0.2 * torch.rand(5, generator=g)
    ops = [(A.adjust_brightness, fb), (A.adjust_contrast, fc), (A.adjust_saturation, fs),
           (A.adjust_hue, fh)]
    ref = x
    for i in order:
        ref = ops[i][0](ref, ops[i][1])
    assert bool(mask.all())
    torch.testing.assert_close(A.color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=1.0, g=gen(3)), ref)


def test_random_grayscale(imgs):
    ref = TF.rgb_to_grayscale(imgs, num_output_channels=3)  # torchvision's weights: 0.2989 vs 0.299
    torch.testing.assert_close(A.random_grayscale(imgs, 1.0, gen(0)), ref, atol=1.5e-4, rtol=0)
    luma = 0.299 * imgs[:, 0] + 0.587 * imgs[:, 1] + 0.114 * imgs[:, 2]
    torch.testing.assert_close(A.random_grayscale(imgs, 1.0, gen(0)), luma[:, None].expand_as(imgs))
    assert torch.equal(A.random_grayscale(imgs, 0.0, gen(0)), imgs)


# ----------------------------------------------------------------------------- blur, solarize, rot
@pytest.mark.parametrize("k", [3, 5, 4])
def test_blur_matches_torchvision(imgs, k):
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.7])
    ours = A.blur(imgs, k, sig)
    kk = k if k % 2 else k + 1
    for i in range(imgs.shape[0]):
        ref = TF.gaussian_blur(imgs[i], [kk, kk], [float(sig[i])] * 2)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def test_gaussian_blur_p(imgs):
    assert torch.equal(A.gaussian_blur(imgs, 5, p=0.0, g=gen(0)), imgs)
    y = A.gaussian_blur(imgs, 5, sigma=(0.5, 2.0), p=1.0, g=gen(0))
    assert all(not torch.allclose(y[i], imgs[i]) for i in range(len(imgs)))
    # the sigma drawn for the sample matches a direct blur with that sigma
    g = gen(0)
    torch.rand(len(imgs), generator=g)  # the p mask
    s = 0.5 + 1.5 * torch.rand(len(imgs), generator=g)
    torch.testing.assert_close(y, A.blur(imgs, 5, s))


def test_solarize(imgs):
    assert torch.equal(A.solarize(imgs, 0.5, 0.0, gen(0)), imgs)
    torch.testing.assert_close(A.solarize(imgs, 0.5, 1.0, gen(0)), TF.solarize(imgs, 0.5))


def test_hflip(imgs):
    assert torch.equal(A.hflip(imgs, 0.0, gen(0)), imgs)
    assert torch.equal(A.hflip(imgs, 1.0, gen(0)), imgs.flip(-1))
    y = A.hflip(imgs, 0.5, gen(4))
    for i in range(len(imgs)):
        assert torch.equal(y[i], imgs[i]) or torch.equal(y[i], imgs[i].flip(-1))


def test_rotate90():
    x = torch.rand(9, 3, 8, 8, generator=gen(0))
    k = torch.tensor([0, 1, 2, 3, 4, -1, 1, 2, 7])
    y = A.rotate90(x, k)
    for i in range(9):
        assert torch.equal(y[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))


def test_normalize_and_to_float():
    u = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=gen(0))
    cl = u.contiguous(memory_format=torch.channels_last)
    x = A.to_float(cl)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, u.float() / 255)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    torch.testing.assert_close(A.normalize(x, mean, std), TF.normalize(x, list(mean), list(std)))


# ----------------------------------------------------------------------------- pipeline
def test_batch_augment_shape_stats_and_autocast():
    u = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, generator=gen(0))
    cfg = A.ViewConfig(size=32, blur_p=0.5, solarize_p=0.1)
    aug = A.BatchAugment(cfg)
    y = aug(u, gen(1))
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    lo = (0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    hi = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert bool((y >= lo.view(1, 3, 1, 1) - 1e-5).all() and (y <= hi.view(1, 3, 1, 1) + 1e-5).all())
    assert abs(float(y.mean())) < 1.0 and 0.1 < float(y.std()) < 2.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = aug(u, gen(1))
        e = A.eval_transform(u, 32, cfg.mean, cfg.std)
    assert z.dtype == torch.float32 and torch.equal(z, y)
    assert e.dtype == torch.float32


def test_batch_augment_all_ops_off_is_resize_normalize():
    u = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    cfg = A.ViewConfig(scale=(1, 1), ratio=(1, 1), hflip_p=0, jitter_p=0, gray_p=0)
    y = A.BatchAugment(cfg)(u, gen(0))
    torch.testing.assert_close(y, A.eval_transform(u, 32, cfg.mean, cfg.std), atol=1e-4, rtol=0)


def test_eval_transform_resize():
    u = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen(0))
    y = A.eval_transform(u, 32, (0.5,) * 3, (0.25,) * 3)
    ref = TF.resize(u.float() / 255, [32, 32], antialias=True)
    torch.testing.assert_close(y, (ref - 0.5) / 0.25, atol=1e-4, rtol=0)


def test_blur_kernel_size_from_config():
    assert A.ViewConfig(size=32).blur_kernel_size == 3
    assert A.ViewConfig(size=224).blur_kernel_size == 23
    assert math.isclose(A.ViewConfig().ratio[1], 4 / 3)
