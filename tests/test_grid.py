"""The shared patch grid (``sslhub.data.grid``): geometry against the papers' numbers, patches against a
coordinate-encoded image, the shared-seed draws, and the anti-shortcut guards against written-out maths."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslhub.data.grid import (
    GREEN_MAGENTA,
    PatchGuards,
    RowDraws,
    drop_colour_channels,
    gapped_grid,
    guard_patches,
    normalize_each_patch,
    overlapping_grid,
    pixelate,
    pixelate_sides,
    project_out_green_magenta,
    sample_positions,
    take_patches,
)
from sslhub.errors import InputError


def coordinate_image(n: int, size: int) -> torch.Tensor:
    """``(n, 3, size, size)`` float: channel 0 = row, channel 1 = column, channel 2 = the sample's index."""
    r = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1).expand(n, 1, size, size)
    c = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(n, 1, size, size)
    i = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size)
    return torch.cat([r, c, i], 1)


def test_geometry_reproduces_the_papers_layouts():
    # Doersch et al.: 96-px patches, 48-px gaps (cells of 144), jitter up to 7 px
    g = gapped_grid(432, 3, 2 / 3, 7 / 96)
    assert (g.stride, g.patch, g.jitter, g.centre, g.slack) == (144, 96, 7, 24, 0)
    # Noroozi & Favaro: a 225-px crop, 75-px cells, a 64-px tile anywhere in its cell (11 px of room)
    g = gapped_grid(225, 3, 64 / 75, 1.0)
    assert (g.stride, g.patch, g.centre, g.jitter) == (75, 64, 5, 5)
    # CPC (van den Oord et al.; Hénaff et al.): 256-px images, 7×7 patches of 64 px at stride 32
    g = overlapping_grid(256, 7, 0.5)
    assert (g.n, g.patch, g.stride, g.jitter, g.span) == (7, 64, 32, 0, 256)
    g = overlapping_grid(32, 7, 0.5)  # the CIFAR layout of CPC implementations: 8-px patches at stride 4
    assert (g.patch, g.stride, g.span) == (8, 4, 32)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(InputError, match="patch side"):
        gapped_grid(32, 3, 1.5, 0.0)
    with pytest.raises(InputError, match="no room"):
        gapped_grid(2, 3, 0.5, 0.0)
    with pytest.raises(InputError, match="overlap"):
        overlapping_grid(32, 7, 1.0)


@pytest.mark.parametrize("size,frac,jitter", [(32, 0.67, 0.075), (32, 0.85, 1.0), (96, 0.67, 0.15), (16, 0.67, 0.075)])
def test_gapped_patches_stay_in_their_cells_with_gaps_and_use_the_whole_jitter(size, frac, jitter):
    geom = gapped_grid(size, 3, frac, jitter)
    n = 400
    tops, lefts = sample_positions(geom, RowDraws(0, 0, n))
    x = coordinate_image(n, size)
    p = take_patches(x, tops, lefts, geom.patch)  # (n, 9, 3, p, p)
    assert p.shape == (n, 9, 3, geom.patch, geom.patch)
    # the patch holds exactly the pixels at its corner: rows t … t+p-1, columns l … l+p-1, of its own sample
    ar = torch.arange(geom.patch, dtype=torch.float32)
    assert torch.equal(p[:, :, 0], (tops[..., None, None].float() + ar.view(1, 1, -1, 1)).expand_as(p[:, :, 0]))
    assert torch.equal(p[:, :, 1], (lefts[..., None, None].float() + ar.view(1, 1, 1, -1)).expand_as(p[:, :, 1]))
    assert torch.equal(p[:, :, 2], torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand_as(p[:, :, 2]))
    # cell (r, c) of sample i starts at origin + (r, c)·cell; the patch stays inside it, ± jitter around its centre
    cells = torch.arange(9)
    row, col = cells // 3, cells % 3
    off_r = tops - row * geom.stride  # origin + centre + jitter
    off_c = lefts - col * geom.stride
    assert (off_r.max(1).values - off_r.min(1).values).max() <= 2 * geom.jitter  # one origin a sample, ± jitter
    assert (off_c.max(1).values - off_c.min(1).values).max() <= 2 * geom.jitter
    assert (tops - row * geom.stride).min() >= 0 and (tops - row * geom.stride + geom.patch).max() <= size - 2 * geom.stride
    assert tops.min() >= 0 and lefts.min() >= 0 and (tops + geom.patch).max() <= size and (lefts + geom.patch).max() <= size
    # neighbours never overlap: the gap between horizontally adjacent patches is >= 0 (>= 1 when the cell has room)
    gap = lefts[:, [1, 2, 4, 5, 7, 8]] - (lefts[:, [0, 1, 3, 4, 6, 7]] + geom.patch)
    assert gap.min() >= (1 if geom.stride > geom.patch and geom.jitter * 2 < geom.stride - geom.patch else 0)
    if geom.jitter:  # every jitter value is drawn
        j = off_r - off_r.float().mean(1, keepdim=True).round().long()
        assert j.max() >= geom.jitter - 1 and j.min() <= -(geom.jitter - 1)


def test_centred_grid_has_no_randomness_and_sits_in_the_middle():
    geom = gapped_grid(32, 3, 0.85, 1.0)  # cells of 10, tiles of 8 (actually round(8.5) = 8), slack 2
    tops, lefts = sample_positions(geom, count=3)
    assert torch.equal(tops, sample_positions(geom, count=3)[0])
    assert tops[0].tolist() == [1 + 1] * 3 + [1 + 1 + 10] * 3 + [1 + 1 + 20] * 3  # origin slack/2 = 1, centre 1
    assert lefts[0].tolist() == [2, 12, 22] * 3


def test_row_draws_give_each_process_the_rows_of_the_whole_batch():
    """A batch split at offsets 0 / 3 / 5 draws exactly the rows one draw for all 8 gives (positions, labels)."""
    geom = gapped_grid(32, 3, 0.67, 0.1)
    whole = RowDraws(123, 0, 8)
    t, l = sample_positions(geom, whole)
    lab, u, eps = whole.randint(0, 8), whole.rand(2), whole.randn(2, 3, 5, 5)
    for start, n in ((0, 3), (3, 2), (5, 3), (0, 1), (7, 1)):
        part = RowDraws(123, start, n)
        pt, pl = sample_positions(geom, part)
        assert torch.equal(pt, t[start:start + n]) and torch.equal(pl, l[start:start + n])
        assert torch.equal(part.randint(0, 8), lab[start:start + n])
        assert torch.equal(part.rand(2), u[start:start + n])
        assert torch.equal(part.randn(2, 3, 5, 5), eps[start:start + n])
    assert abs(float(eps.mean())) < 0.15 and abs(float(eps.std()) - 1) < 0.1  # Gaussian (1,200 numbers)


def test_colour_dropping_keeps_one_channel_and_fills_the_others_with_scaled_noise():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(64, 3, 8, 8, generator=g)
    keep = torch.randint(0, 3, (64,), generator=g)
    eps = torch.randn(64, 3, 8, 8, generator=g)
    fill = torch.tensor([0.4, 0.5, 0.6])
    out = drop_colour_channels(p, keep, eps, fill, noise=0.01)
    for i in range(64):
        k = int(keep[i])
        assert torch.equal(out[i, k], p[i, k])
        sd = p[i, k].std(unbiased=False)
        for c in {0, 1, 2} - {k}:
            assert torch.allclose(out[i, c], fill[c] + 0.01 * sd * eps[i, c], atol=1e-7)


def test_projection_removes_the_green_magenta_axis_and_keeps_gray():
    a = torch.tensor(GREEN_MAGENTA)
    assert abs(float(a.norm()) - 1) < 1e-6 and abs(float(a.sum())) < 1e-6  # unit, orthogonal to gray
    p = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = project_out_green_magenta(p)
    assert float((out * a.view(3, 1, 1)).sum(1).abs().max()) < 1e-6
    gray = torch.full((1, 3, 2, 2), 0.3)
    assert torch.allclose(project_out_green_magenta(gray), gray)
    # pure green on gray: (0.5, 0.5 + 2d, 0.5) has its whole tint along the axis → back to its mean level
    tinted = torch.tensor([0.5, 0.9, 0.5]).view(1, 3, 1, 1)
    m = 0.5 + 0.4 / 3
    assert torch.allclose(project_out_green_magenta(tinted).flatten(), torch.tensor([m, m, m]), atol=1e-6)


def test_pixelate_is_block_means_then_bilinear_and_sides_follow_the_draws():
    p = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = pixelate(p, torch.tensor([4, 8]))
    blocks = p[0].view(3, 4, 2, 4, 2).mean(dim=(2, 4))  # 2×2 block means: area down-sampling to 4 px
    want = F.interpolate(blocks[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out[0], want, atol=1e-6)
    assert torch.equal(out[1], p[1])  # side = h: untouched
    sides = pixelate_sides(torch.tensor([0.1, 0.9, 0.2, 0.3]), torch.tensor([0.0, 0.5, 0.999, 0.5]), 10, 0.5, 0.3)
    assert sides.tolist() == [3, 10, 9, 6]  # hit: 3 + ⌊u·7⌋ (3 … 9); the second is not hit


def test_each_patch_is_normalised_on_its_own():
    g = torch.Generator().manual_seed(6)
    p = torch.rand(4, 9, 3, 8, 8, generator=g) * torch.rand(4, 9, 3, 1, 1, generator=g) * 5 + 2  # means 2 … 7
    out = normalize_each_patch(p)
    assert torch.allclose(out.mean(dim=(-2, -1)), torch.zeros(4, 9, 3), atol=1e-4)  # float32 rounding of ~1e-6
    assert torch.allclose(out.std(dim=(-2, -1), unbiased=False), torch.ones(4, 9, 3), atol=1e-3)


def test_guards_draw_the_same_numbers_whichever_are_on():
    p = torch.rand(6, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fill = torch.tensor([0.5, 0.5, 0.5])
    both = guard_patches(p, PatchGuards(colour="drop", pixelate_p=0.0), RowDraws(7, 0, 6), fill)
    again = guard_patches(p, PatchGuards(colour="drop", pixelate_p=0.0), RowDraws(7, 0, 6), fill)
    assert torch.equal(both, again)
    d = RowDraws(7, 0, 6)
    keep, eps = d.randint(0, 3, 2), d.randn(2, 3, 8, 8)
    want = drop_colour_channels(p.flatten(0, 1), keep.flatten(), eps.flatten(0, 1), fill, 0.01).view_as(p)
    assert torch.equal(both, want)
    none = guard_patches(p, PatchGuards(colour="none", pixelate_p=0.0), RowDraws(7, 0, 6), fill)
    assert torch.equal(none, p)
    assert not PatchGuards(colour="none", pixelate_p=0.0).active and PatchGuards().active
    assert math.isclose(PatchGuards().colour_noise, 0.01)
