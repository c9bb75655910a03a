import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from dist_worker import assert_grads_close
from swav_queue_worker import STEPS as QUEUE_STEPS
from swav_queue_worker import queue_run
from test_distributed import ENV, TORCHRUN

from sslhub.methods.base import Batch
from sslhub.methods.registry import get_method
from sslhub.methods.swav import sinkhorn, swapped_prediction_loss
from sslhub.train.recipe import recipe_from_dict

TINY_ENCODER = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}


def make(**args):
    args = {"views": {"size": 16}, "local_views": {"size": 8}, "n_local_views": 2, "n_prototypes": 32,
            "proj_hidden_dim": 32, "proj_dim": 16, **args}
    r = recipe_from_dict({"method": "swav", "encoder": TINY_ENCODER, "method_args": args})
    torch.manual_seed(0)
    return get_method("swav").create(r.encoder, r.method_args)


def images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- Sinkhorn–Knopp
def sinkhorn_loop(scores, eps, iterations):
    """The official distributed_sinkhorn written out entry by entry, in float64 (one process)."""
    s = scores.double().tolist()
    n, k = len(s), len(s[0])
    q = [[math.exp(s[b][j] / eps) for b in range(n)] for j in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):  # every prototype gets total weight 1/K
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for b in range(n):  # every sample gets total weight 1/B
            c = sum(q[j][b] for j in range(k))
            for j in range(k):
                q[j][b] = q[j][b] / c / n
    return torch.tensor([[q[j][b] * n for j in range(k)] for b in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("eps,iterations", [(0.05, 3), (0.05, 1), (0.5, 3), (0.005, 3)])
def test_sinkhorn_matches_written_out_loop(eps, iterations):
    scores = unit(7, 16) @ unit(5, 16, seed=1).T  # (B, K) cosines, as z·Cᵀ
    got = sinkhorn(scores, eps, iterations)
    assert got.shape == (7, 5) and torch.isfinite(got).all()  # eps 0.005: exp(s / eps) alone overflows float32
    assert torch.allclose(got.double(), sinkhorn_loop(scores, eps, iterations), rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    """Each code sums to 1 over the prototypes (exactly, the last step normalises columns); each
    prototype's total over the batch tends to B/K as the iterations grow."""
    b, k = 24, 6
    scores = unit(b, 8, seed=2) @ unit(k, 8, seed=3).T
    q3 = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(q3.sum(1), torch.ones(b), atol=1e-5)
    assert (q3 >= 0).all()
    err = [(sinkhorn(scores, 0.05, it).sum(0) - b / k).abs().max().item() for it in (1, 3, 10, 100)]
    assert err[0] > err[1] > err[2] > err[3] and err[0] > 0.1 * b / k  # 3 iterations only approach it
    assert err[3] < 1e-4 * b / k


def test_codes_carry_no_gradient():
    """d loss / d scores is the cross-entropy gradient with the codes held constant:
    ∂L/∂s_v[b] = Σ_{i∈A, i≠v} (softmax(s_v[b] / τ) − q_i[b]) / (τ·|A|·(V−1)·B)."""
    v_n, b, k, tau = 4, 5, 6, 0.1
    scores = (unit(v_n, b, 8, seed=4) @ unit(k, 8, seed=5).T).requires_grad_(True)  # (V, B, K)
    assign = (0, 1)
    codes = torch.stack([sinkhorn(scores[i], 0.05, 3) for i in assign])
    assert not codes.requires_grad
    swapped_prediction_loss(scores, codes, assign, tau).backward()
    p = torch.softmax(scores.detach() / tau, dim=-1)
    want = torch.zeros_like(p)
    for a, i in enumerate(assign):
        for v in range(v_n):
            if v != i:
                want[v] += (p[v] - codes[a]) / (tau * len(assign) * (v_n - 1) * b)
    assert torch.allclose(scores.grad, want, atol=1e-6)


# ----------------------------------------------------------------------------- swapped prediction
def loss_loop(scores, codes, assign, tau):
    """[0] Eq. 1–2 written out: −Σ_k q_i^(k) log p_v^(k) over samples, other crops, assigned crops."""
    s, q = scores.double().tolist(), codes.double().tolist()
    v_n, b, k = len(s), len(s[0]), len(s[0][0])
    total = 0.0
    for a, i in enumerate(assign):
        sub = 0.0
        for v in range(v_n):
            if v == i:
                continue
            for n in range(b):
                den = sum(math.exp(s[v][n][j] / tau) for j in range(k))
                sub -= sum(q[a][n][j] * math.log(math.exp(s[v][n][j] / tau) / den) for j in range(k)) / b
        total += sub / (v_n - 1)
    return total / len(assign)


@pytest.mark.parametrize("assign,tau", [((0, 1), 0.1), ((1,), 0.1), ((0, 2), 0.5)])
def test_loss_matches_written_out_loop(assign, tau):
    scores = unit(4, 5, 8, seed=6) @ unit(7, 8, seed=7).T  # (V, B, K)
    codes = torch.stack([sinkhorn(scores[i], 0.05, 3) for i in assign])
    got = swapped_prediction_loss(scores, codes, assign, tau).item()
    assert got == pytest.approx(loss_loop(scores, codes, assign, tau), rel=1e-5)


def test_loss_is_low_when_other_crops_predict_the_codes():
    c = unit(8, 16, seed=8)
    z = unit(8, 16, seed=9)
    same = (z @ c.T).expand(3, -1, -1)  # every crop gives the same embedding
    other = torch.stack([z @ c.T, unit(8, 16, seed=10) @ c.T, unit(8, 16, seed=11) @ c.T])
    codes = torch.stack([sinkhorn(same[i], 0.05, 3) for i in (0, 1)])
    codes_o = torch.stack([sinkhorn(other[i], 0.05, 3) for i in (0, 1)])
    assert swapped_prediction_loss(same, codes, (0, 1), 0.1) < swapped_prediction_loss(other, codes_o, (0, 1), 0.1)


# ----------------------------------------------------------------------------- the method
def step(m, opt, s, imgs):
    """One training step; returns the loss dict, the prototypes' gradient and the backbone's |gradient|."""
    out = m.loss(Batch(imgs, rng=torch.Generator().manual_seed(s), step=s))
    out["loss"].backward()
    grad = None if m.prototypes.weight.grad is None else m.prototypes.weight.grad.clone()
    backbone = sum(float(p.grad.abs().sum()) for p in m.backbone.parameters() if p.grad is not None)
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.on_step_end(s, 10)
    return out, grad, backbone


def test_prototypes_are_unit_norm_in_the_loss_and_after_a_step():
    m = make()
    with torch.no_grad():  # off the sphere, as an optimiser step leaves them
        m.prototypes.weight.mul_(torch.rand(32, 1, generator=torch.Generator().manual_seed(0)) * 3 + 0.1)
    out = m.loss(Batch(images(), rng=torch.Generator().manual_seed(0)))
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(32), atol=1e-6)  # normalised before use
    out["loss"].backward()
    torch.optim.SGD([m.prototypes.weight], lr=1.0).step()
    assert (m.prototypes.weight.norm(dim=1) - 1).abs().max() > 1e-3  # the step moved them off the sphere ...
    m.on_step_end(0, 10)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(32), atol=1e-6)  # ... and back


def test_prototypes_frozen_during_the_first_epoch():
    m = make(freeze_prototypes_epochs=1)
    m.configure(steps_per_epoch=2, max_steps=10)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for s in range(3):
        before = m.prototypes.weight.detach().clone()
        out, grad, backbone = step(m, opt, s, images())
        assert backbone > 0, f"step {s}: the backbone trains, frozen prototypes or not"
        if s < 2:
            assert grad is None and out["prototypes_frozen"] == 1, f"step {s}"
            moved = (m.prototypes.weight - before).abs().max()
            assert moved < 1e-6, f"step {s}: frozen prototypes moved by {moved:.3g}"  # renormalising only
        else:
            assert grad is not None and grad.abs().sum() > 0 and out["prototypes_frozen"] == 0
            assert (m.prototypes.weight - before).abs().max() > 1e-4
    # outside the trainer (no configure) the first epoch counts as passed: not frozen
    m2 = make()
    out = m2.loss(Batch(images(), rng=torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert out["prototypes_frozen"] == 0 and m2.prototypes.weight.grad.abs().sum() > 0


def test_queue_fills_fifo_and_is_used_once_full():
    m = make(queue_length=8, n_local_views=1)
    b, d, k = 4, 16, 32
    c = unit(k, d, seed=20)
    zs = [unit(3, b, d, seed=21 + t) for t in range(3)]  # (V, B, d) per step: 2 global + 1 local crop
    expect_used = [False, False, True]
    for t, z in enumerate(zs):
        scores = z @ c.T
        queue_before = m.queue.clone()
        codes, used = m._codes(scores, z, c, step=t)
        assert used == expect_used[t], f"step {t}"
        for a in (0, 1):
            s = torch.cat([queue_before[a] @ c.T, scores[a]]) if used else scores[a]
            assert torch.allclose(codes[a], sinkhorn(s, 0.05, 3)[-b:], atol=1e-6), f"step {t}, crop {a}"
        if used:  # 8 queued samples change the codes
            assert not torch.allclose(codes[0], sinkhorn(scores[0], 0.05, 3), atol=1e-3)
        assert torch.equal(m.queue, queue_before)  # taken after the optimiser step, not while coding
        m.on_step_end(t, 10)
        assert int(m.queue_filled) == min(4 * (t + 1), 8)
    # newest first: step 2's global crops, then step 1's; step 0's were pushed out
    assert torch.equal(m.queue, torch.cat([zs[2][:2], zs[1][:2]], dim=1))


def test_queue_starts_at_its_epoch_and_holds_unit_embeddings():
    m = make(queue_length=16, epoch_queue_starts=1)
    m.configure(steps_per_epoch=1, max_steps=10)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    filled, used = [], []
    for s in range(4):
        out, _, _ = step(m, opt, s, images())
        filled.append(int(m.queue_filled))
        used.append(float(out["queue_used"]))
    assert filled == [0, 8, 16, 16] and used == [0, 0, 0, 1]
    assert torch.allclose(m.queue.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    assert "queue" in m.state_dict() and "queue_filled" in m.state_dict()  # survives --resume


def test_queue_not_a_multiple_of_the_batch_raises_at_the_first_step():
    m = make(queue_length=12, epoch_queue_starts=15)
    m.configure(steps_per_epoch=2, max_steps=100)  # the queue would start at step 30: the error comes now
    with pytest.raises(ValueError, match=r"method_args\.queue_length=12 .*multiple of the global batch"):
        m.loss(Batch(images(8), rng=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 0.0), ("epsilon", 0.0), ("sinkhorn_iterations", 0),
    ("n_prototypes", 0), ("n_local_views", -1), ("crops_for_assign", [0, 0]), ("crops_for_assign", [4]),
    ("crops_for_assign", []), ("queue_length", -8), ("epoch_queue_starts", -1), ("freeze_prototypes_epochs", -1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"method_args\.{field}="):
        make(**{field: value})


def test_step_trains_and_reports_diagnostics():
    m = make()
    out = m.loss(Batch(images(), rng=torch.Generator().manual_seed(0)))
    assert set(out) == {"loss", "z_std", "code_max", "queue_used", "prototypes_frozen"}
    assert all(v.dim() == 0 and not v.requires_grad for k, v in out.items() if k != "loss")
    assert 0 < out["loss"].item() and 1 / 32 - 1e-6 <= out["code_max"].item() <= 1
    assert 0 < out["z_std"].item() < 1


def test_two_processes_with_the_queue_equal_one(tmp_path):
    """With the queue in the Sinkhorn codes, 2 processes x 4 images = 1 process x 8, step for step."""
    imgs = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.save(imgs, tmp_path / "images.pt")
    subprocess.run([*TORCHRUN, str(REPO / "tests/swav_queue_worker.py"), str(tmp_path)], check=True, env=ENV,
                   cwd=tmp_path, timeout=300)
    one, used = queue_run(imgs, str(tmp_path))
    assert used == [0, 0, 0, 1]  # filled in steps 1–2, used in step 3
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got.pop("queue_used").tolist() == used
        assert set(got) == set(one) and "state.queue" in one
        for s in range(QUEUE_STEPS):
            assert got[f"loss{s}"].item() == pytest.approx(one[f"loss{s}"].item(), rel=1e-5), f"loss of step {s}"
            prefix = f"grad{s}."
            assert_grads_close({k: v for k, v in got.items() if k.startswith(prefix)},
                               {k: v for k, v in one.items() if k.startswith(prefix)}, s)
        for k in (k for k in one if k.startswith("state.")):
            assert torch.allclose(got[k], one[k], rtol=1e-4, atol=1e-5), \
                f"{k}: max diff {(got[k] - one[k]).abs().max():.3g}"
