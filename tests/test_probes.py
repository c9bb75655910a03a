import numpy as np
import pytest
import torch
from conftest import SAMPLE

from sslhub.data.images import decode_all
from sslhub.data.sources import open_source
from sslhub.eval.finetune import finetune
from sslhub.eval.linear import balanced_subset, linear_probe, low_shot
from sslhub.models.backbone import Backbone, EncoderConfig


def _blobs(n_per, classes=4, dim=16, noise=0.3, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2  # shared by splits
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_linear_probe_separable_and_picks_c_on_heldout_only():
    xtr, ytr = _blobs(50)
    xte, yte = _blobs(20, seed=1)
    res = linear_probe(xtr, ytr, xte, yte, c_grid=(1e-6, 1.0))
    assert res["top1"] >= 95 and res["C"] == 1.0
    assert set(res["heldout_top1"]) == {"1e-06", "1.0"} and res["heldout_top1"]["1e-06"] < 50 and res["test_size"] == 80


def test_linear_probe_on_noise_is_near_chance():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    y, yt = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    assert linear_probe(x, y, xt, yt, c_grid=(1.0,))["top1"] < 40


def test_balanced_subset_and_low_shot():
    y = np.repeat(np.arange(5), 100)
    idx = balanced_subset(y, 0.1, seed=3)
    assert len(idx) == 50 and all((y[idx] == c).sum() == 10 for c in range(5))
    assert np.array_equal(idx, balanced_subset(y, 0.1, seed=3))
    assert len(balanced_subset(y, 0.001)) == 5  # at least one per class
    xtr, ytr = _blobs(100, classes=5)
    xte, yte = _blobs(20, classes=5, seed=1)
    res = low_shot(xtr, ytr, xte, yte, fractions=(0.02, 0.1), c_grid=(1.0,))
    assert res["2%"]["labels"] == 10 and res["10%"]["labels"] == 50 and res["10%"]["top1"] > 80


def test_linear_probe_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(torch.randn(10, 3), torch.zeros(10, dtype=torch.long), torch.randn(3, 3), torch.zeros(3, dtype=torch.long))


def test_finetune_learns_and_leaves_the_original_untouched():
    train = decode_all(open_source(SAMPLE, "train"), 32, progress=False)
    test = decode_all(open_source(SAMPLE, "test"), 32, progress=False)
    torch.manual_seed(0)
    bb = Backbone(EncoderConfig(arch="resnet18", cifar_stem=True, image_size=32, model_args={"channels": [8, 16, 32, 32]}))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    res = finetune(bb, train, test, epochs=2, lr=2e-3, batch_size=64, warmup_epochs=0.2, progress=False)
    assert res["steps"] == 30 and 0 <= res["top1"] <= 100
    assert res["top1"] > 15, "two epochs of supervised fine-tuning beat chance (10%) on real CIFAR images"
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())
