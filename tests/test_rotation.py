import numpy as np
import torch
from PIL import Image

from sslhub.methods.rotation import rotate_all


def test_rotate_all_rows_and_labels():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    r, k = rotate_all(x)
    assert r.shape == (8, 3, 4, 4)
    assert k.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(8):
        i, rot = row % 2, row // 2
        assert torch.equal(r[row], torch.rot90(x[i], rot, dims=(-2, -1)))


def test_rotation_is_counter_clockwise_like_pil():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    r, _ = rotate_all(x)
    for k in range(4):
        ref = np.asarray(img.rotate(90 * k))  # PIL: counter-clockwise degrees
        assert np.array_equal(r[k].permute(1, 2, 0).numpy().astype(np.uint8), ref)


def test_four_rotations_are_distinct_and_invertible():
    x = torch.rand(3, 3, 8, 8)
    r, _ = rotate_all(x)
    for k in range(1, 4):
        assert not torch.equal(r[k * 3 : (k + 1) * 3], x)
        assert torch.equal(torch.rot90(r[k * 3 : (k + 1) * 3], -k, dims=(-2, -1)), x)
