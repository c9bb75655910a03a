"""Inpainting masks and the context encoder's weighted reconstruction loss (``sslhub.data.regions``) against
written-out geometry and a per-pixel loop."""
import pytest
import torch

from sslhub.data.grid import RowDraws
from sslhub.data.regions import border, central_square, masked_l2, random_blocks, random_regions


def test_central_square_is_the_papers_hole():
    m = central_square(2, 128)  # Pathak et al.: 64 × 64 in the middle of 128 × 128
    assert m.shape == (2, 128, 128) and m.sum(dim=(1, 2)).tolist() == [64 * 64] * 2
    assert m[0, 32:96, 32:96].all() and not m[0, :32].any() and not m[0, 96:].any() and not m[0, :, :32].any()


def test_random_blocks_are_the_union_of_the_drawn_squares():
    draws = RowDraws(3, 0, 5)
    m = random_blocks(32, draws, count=3, block_frac=0.25)
    corners = RowDraws(3, 0, 5).randint(0, 32 - 8 + 1, 3, 2)
    want = torch.zeros(5, 32, 32, dtype=torch.bool)
    for i in range(5):
        for t, l in corners[i].tolist():
            want[i, t : t + 8, l : l + 8] = True
    assert torch.equal(m, want)
    assert (m.sum(dim=(1, 2)) <= 3 * 64).all()  # at most a quarter of 32² with overlaps


def test_random_regions_hide_exactly_the_share_asked_and_differ_per_image():
    m = random_regions(32, RowDraws(0, 0, 6), coverage=0.25)
    assert m.sum(dim=(1, 2)).tolist() == [256] * 6
    assert len({bytes(x.numpy().tobytes()) for x in m}) == 6
    # smooth shapes: far fewer hidden/visible boundaries than 256 scattered pixels would make
    edges = (m[:, 1:] != m[:, :-1]).sum(dim=(1, 2)) + (m[:, :, 1:] != m[:, :, :-1]).sum(dim=(1, 2))
    assert edges.max() < 160  # ~900 for random pixels
    # an image's mask depends on its place in the global batch, not on the split
    assert torch.equal(random_regions(32, RowDraws(0, 4, 2), coverage=0.25), m[4:])


def test_border_is_the_ring_of_the_hole_next_to_the_context():
    m = central_square(1, 16, frac=0.5)  # rows/cols 4 … 11
    ring = border(m, 2)
    inner = torch.zeros_like(m)
    inner[0, 6:10, 6:10] = True
    assert torch.equal(ring, m & ~inner)
    assert not border(m, 0).any()


def test_masked_l2_is_the_weighted_mean_over_the_hole():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 12, 12, generator=g), torch.randn(2, 3, 12, 12, generator=g)
    mask = central_square(2, 12, frac=0.5)  # rows/cols 3 … 8
    mask[1] = random_blocks(12, RowDraws(1, 0, 1), count=2, block_frac=0.4)[0]
    got = masked_l2(pred, target, mask, border_width=1, border_weight=10.0)
    num = den = 0.0
    for i in range(2):
        for r in range(12):
            for c in range(12):
                if not mask[i, r, c]:
                    continue
                near_visible = any(not mask[i, rr, cc] for rr in range(max(0, r - 1), min(12, r + 2))
                                   for cc in range(max(0, c - 1), min(12, c + 2)))
                w = 10.0 if near_visible else 1.0
                for ch in range(3):
                    num += w * float(pred[i, ch, r, c] - target[i, ch, r, c]) ** 2
                    den += w
    assert got.item() == pytest.approx(num / den, rel=1e-5)
    # the visible pixels do not count
    pred2 = pred.clone()
    pred2[~mask.unsqueeze(1).expand_as(pred2)] = 1e3
    assert masked_l2(pred2, target, mask, 1, 10.0).item() == pytest.approx(got.item(), rel=1e-6)
