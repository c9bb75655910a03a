"""CPC over a patch grid (sslhub/methods/cpc.py): the loss against a written-out reference, the causality of the
context network and the predictions, the positive's place among the candidates, the config's checks, and the
held-out pretext evaluation.  2 processes = 1 and accumulation: the registry-driven tests/test_distributed.py and
tests/test_accumulate.py."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO, SAMPLE

from sslhub.config import ConfigError, InvalidValue
from sslhub.data.images import decode_all
from sslhub.data.sources import open_source
from sslhub.methods.base import Batch
from sslhub.methods.cpc import CPC, ContextNetwork, CPCConfig, cpc_infonce
from sslhub.train.recipe import load_recipe

G, B, D, K = 4, 2, 3, 3


def reference_loss(preds: list[torch.Tensor], z: torch.Tensor) -> float:
    """Loops over k, rows i, columns j of every image and all candidate patches: −log softmax by hand."""
    b_n, g = z.shape[0], z.shape[1]
    cands = [(b, u, v) for b in range(b_n) for u in range(g) for v in range(g)]
    per_k = []
    for k in range(1, len(preds) + 1):
        terms = []
        for b in range(b_n):
            for i in range(g - k):
                for j in range(g):
                    q = preds[k - 1][b, i, j].tolist()
                    scores = [sum(a * c for a, c in zip(q, z[cb, cu, cv].tolist())) for cb, cu, cv in cands]
                    top = max(scores)
                    lse = top + math.log(sum(math.exp(s - top) for s in scores))
                    pos = sum(a * c for a, c in zip(q, z[b, i + k, j].tolist()))
                    terms.append(lse - pos)
        per_k.append(sum(terms) / len(terms))
    return sum(per_k) / len(per_k)


def test_loss_equals_the_written_out_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, G, G, D, generator=g)
    preds = [torch.randn(B, G - k, G, D, generator=g) for k in range(1, K + 1)]
    loss, accs = cpc_infonce(preds, z)
    assert loss.item() == pytest.approx(reference_loss(preds, z), rel=1e-5)
    assert accs.shape == (K,) and not accs.requires_grad
    with pytest.raises(ValueError, match="offset 1"):  # predictions of the wrong rows are refused
        cpc_infonce([torch.randn(B, G, G, D)], z)


def one_hot_grid(b: int, g: int) -> torch.Tensor:
    """Every patch of every image its own unit vector: ``(b, g, g, b·g·g)``."""
    return torch.eye(b * g * g).view(b, g, g, b * g * g)


def test_the_positive_is_k_rows_below_in_the_same_column():
    """Predictions that are exactly the patch k rows below (same image, same column) score 100 %; the same
    predictions shifted by one row or one column score 0 %, and the loss rises."""
    z = one_hot_grid(B, G)
    right = [5 * z[:, k:] for k in range(1, K + 1)]
    loss, accs = cpc_infonce(right, z)
    assert accs.tolist() == [1.0] * K
    for wrong in ([5 * z[:, k - 1 : G - 1] for k in range(1, K + 1)],  # one row short: the row k − 1 below
                  [5 * z[:, k:].roll(1, dims=2) for k in range(1, K + 1)],  # the neighbouring column
                  [5 * z[:, k:].roll(1, dims=0) for k in range(1, K + 1)]):  # the same place in another image
        wrong_loss, wrong_accs = cpc_infonce(wrong, z)
        assert wrong_accs.tolist() == [0.0] * K and wrong_loss > loss + 4


def small_method(**args) -> CPC:
    r = load_recipe(REPO / "recipes/cpc_cifar10.yaml", [
        "encoder.image_size=16", "encoder.model_args.channels=[8,16,16,16]", "encoder.model_args.layers=[1,1,1,1]",
        "method_args.context_dim=16", "method_args.views={size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], "
        "hflip_p: 0.0, jitter_p: 0.0, gray_p: 0.0}", *(f"method_args.{k}={v}" for k, v in args.items())])
    torch.manual_seed(0)
    return CPC.create(r.encoder, r.method_args)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_context_and_predictions_at_a_row_see_only_the_rows_above(layers):
    """Perturbing the embeddings of row r leaves the context, and every offset's predictions, of rows < r exactly
    as they were, and changes those of row r."""
    torch.manual_seed(1)
    net = ContextNetwork(D, 8, layers)
    z = torch.randn(B, 7, 7, D)
    c = net(z)
    for r in range(1, 7):
        z2 = z.clone()
        z2[:, r] += torch.randn(B, 7, D)
        c2 = net(z2)
        assert torch.equal(c2[:, :r], c[:, :r]), f"row {r} changed the context above it"
        assert not torch.allclose(c2[:, r], c[:, r]), f"row {r} does not reach its own context"
    m = small_method(context_layers=layers).eval()
    z = torch.randn(B, 7, 7, m.backbone.dim)
    with torch.no_grad():
        preds = m.predict(z)
        for r in range(1, 7):
            z2 = z.clone()
            z2[:, r] += 1.0
            preds2 = m.predict(z2)
            for k, (p, p2) in enumerate(zip(preds, preds2), start=1):
                assert torch.equal(p2[:, :r], p[:, :r]), f"offset {k}: row {r} changed predictions above it"
                if r < 7 - k:  # row r is a query row of offset k
                    assert not torch.allclose(p2[:, r], p[:, r])


@pytest.mark.parametrize("key, value", [("grid", 1), ("pred_steps", 0), ("pred_steps", 7), ("overlap", 1.0),
                                        ("context_dim", 0), ("context_layers", -1)])
def test_config_refuses_bad_values_naming_the_field(key, value):
    with pytest.raises(InvalidValue, match=rf"^{key}: "):
        CPCConfig(**{key: value})


def test_a_view_too_small_for_the_grid_is_a_config_error():
    with pytest.raises(ConfigError, match=r"method_args\.grid=7: .*5-px view \(views\.size\)"):
        load_recipe(REPO / "recipes/cpc_cifar10.yaml", ["method_args.views.size=5"])


def test_grid_origins_follow_the_place_in_the_global_batch():
    """An image's grid origin depends on its place in the step's global batch, not on the split (2 processes =
    1): the corners for images 4–7 drawn as a second micro-batch equal those drawn in one batch of 8.  (At the
    recipes' sizes the grid spans the whole view, no slack: an 18-px view leaves 2 px to move it.)"""
    m = small_method(**{"views.size": 18})
    assert m.geom.slack == 2
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    seen = []
    m.embed = lambda x, tops, lefts: seen.append(tops.clone()) or torch.zeros(x.shape[0], 7, 7, m.backbone.dim)
    m.loss(Batch(images, rng=torch.Generator().manual_seed(0), seed=5, offset=0))
    m.loss(Batch(images[4:], rng=torch.Generator().manual_seed(1), seed=5, offset=4))
    assert torch.equal(seen[0][4:], seen[1])
    assert len({int(t) for t in seen[0][:, 0]}) > 1  # the origins do vary


@pytest.fixture(scope="module")
def sample_images() -> torch.Tensor:
    return decode_all(open_source(str(SAMPLE), "train"), 16, progress=False).images[:32]


def test_evaluate_reports_each_offset_and_learns_above_chance(sample_images):
    """Keys and ranges; after 30 Adam steps on the 32 images the held-out-style accuracy (centred grid, the
    batch's 32 × 49 patches as candidates) is above chance (1 / 1568) ten times over."""
    m = small_method()
    m.eval()
    before = m.evaluate(sample_images, torch.zeros(32, dtype=torch.long))
    assert set(before) == {"cpc_acc", *(f"cpc_acc_k{k}" for k in range(1, 4))}
    assert all(0.0 <= v <= 1.0 for v in before.values())
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for s in range(30):
        out = m.loss(Batch(sample_images, rng=torch.Generator().manual_seed(s), step=s))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    m.eval()
    after = m.evaluate(sample_images, torch.zeros(32, dtype=torch.long), batch_size=32)
    chance = 1 / (32 * 49)
    assert after["cpc_acc"] > 10 * chance and after["cpc_acc"] > before["cpc_acc"], (before, after)
    assert after["cpc_acc"] == pytest.approx(sum(after[f"cpc_acc_k{k}"] for k in range(1, 4)) / 3)
