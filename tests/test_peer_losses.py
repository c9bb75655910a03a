"""sslhub's losses against a peer library's implementation of the same loss (lightly), on the same tensors.

The written-out-maths tests (test_simclr, test_moco, …) say each loss is the paper's formula; these say it is
also what practitioners already run.  Where the two libraries differ on purpose, the test states the
difference and checks it exactly (DINO's centre update, MoCo's queue update, SwAV's prototype handling are
the methods' own and tested elsewhere).  Skipped when lightly is not installed (it is in the ``test`` extra).
"""
import pytest
import torch
import torch.nn.functional as F

lightly_loss = pytest.importorskip("lightly.loss")

from sslhub.methods.barlow_twins import barlow_twins_loss, cross_correlation  # noqa: E402
from sslhub.methods.byol import byol_loss  # noqa: E402
from sslhub.methods.dino import dino_loss, teacher_probs  # noqa: E402
from sslhub.methods.moco_v2 import infonce_queue  # noqa: E402
from sslhub.methods.simclr import nt_xent  # noqa: E402
from sslhub.methods.simsiam import simsiam_loss  # noqa: E402
from sslhub.methods.swav import sinkhorn, swapped_prediction_loss  # noqa: E402
from sslhub.methods.vicreg import vicreg_loss  # noqa: E402

B, D = 16, 32


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def both(fn_ours, fn_peer, *inputs):
    """Values and input gradients of two loss functions on copies of the same inputs."""
    out = []
    for fn in (fn_ours, fn_peer):
        xs = [x.clone().requires_grad_(True) for x in inputs]
        loss = fn(*xs)
        loss.backward()
        out.append((loss.detach(), [x.grad for x in xs]))
    return out


def assert_same(ours, peer):
    """Equal to float32 rounding: sslhub computes losses in float32 at least (``.float()``), whatever the input."""
    (l1, g1), (l2, g2) = ours, peer
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6, abs=1e-7)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None), "one loss sends a gradient into an input the other treats as a target"
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_simclr_nt_xent_equals_lightly(t):
    z1, z2 = randn(B, D, seed=0), randn(B, D, seed=1)
    peer = lightly_loss.NTXentLoss(temperature=t)
    assert_same(*both(lambda a, b: nt_xent(F.normalize(a, dim=1), F.normalize(b, dim=1), t), peer, z1, z2))


def test_moco_v2_queue_infonce_equals_lightly_memory_bank():
    q, k, queue = randn(B, D, seed=0), randn(B, D, seed=1), F.normalize(randn(64, D, seed=2), dim=1)
    peer = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(64, D)).double()
    peer.memory_bank.bank = queue.clone()  # (K, D): lightly hands it out as (D, K)

    def ours(a, b):
        return infonce_queue(F.normalize(a, dim=1), F.normalize(b, dim=1).detach(), queue, 0.2)[0]

    def lightly_(a, b):
        return peer(a, b.detach())  # the key is a target in MoCo: no gradient, as in ours

    assert_same(*both(ours, lightly_, q, k))


def test_byol_and_simsiam_equal_lightly_negative_cosine():
    p1, p2, z1, z2 = (randn(B, D, seed=s) for s in range(4))
    neg_cos = lightly_loss.NegativeCosineSimilarity()

    # SimSiam (Chen & He eq. 4): ½ D(p1, sg z2) + ½ D(p2, sg z1), D the negative cosine
    def lightly_simsiam(a, b, c, d):
        return 0.5 * (neg_cos(a, d.detach()) + neg_cos(b, c.detach()))

    assert_same(*both(simsiam_loss, lightly_simsiam, p1, p2, z1, z2))

    # BYOL eq. 2–3: ‖q̄ − z̄'‖² = 2 − 2 cos per view order, summed: 4 + 2·(negcos(q1, z2) + negcos(q2, z1))
    def lightly_byol(a, b, c, d):
        return 4 + 2 * (neg_cos(a, d.detach()) + neg_cos(b, c.detach()))

    assert_same(*both(byol_loss, lightly_byol, p1, p2, z1, z2))


def test_vicreg_equals_lightly():
    z1, z2 = randn(B, D, seed=0) * 0.5, randn(B, D, seed=1) * 2
    peer = lightly_loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)
    assert_same(*both(lambda a, b: vicreg_loss(a, b, 25.0, 25.0, 1.0, 1.0, 1e-4)["loss"], peer, z1, z2))


def test_barlow_twins_equals_lightly():
    z1, z2 = randn(B, D, seed=0), randn(B, D, seed=1) + randn(B, D, seed=0)

    def ours(a, b):
        bn = lambda z: F.batch_norm(z, None, None, training=True)  # noqa: E731 — the method's affine-free BN
        return barlow_twins_loss(cross_correlation(bn(a), bn(b)), 0.0051)["loss"]

    # lightly normalises with F.batch_norm (eps 1e-5) too, so the two agree to float64 rounding
    assert_same(*both(ours, lightly_loss.BarlowTwinsLoss(lambda_param=0.0051), z1, z2))


@pytest.mark.parametrize("n_local", [0, 4])
def test_dino_loss_with_centre_equals_lightly(n_local):
    k, t_t, t_s = 24, 0.04, 0.1
    student = [randn(B, k, seed=10 + v) for v in range(2 + n_local)]
    teacher = [randn(B, k, seed=20 + v) for v in range(2)]
    center = randn(k, seed=3) * 0.1
    peer = lightly_loss.DINOLoss(output_dim=k, teacher_temp=t_t, student_temp=t_s).double()
    peer.center.copy_(center.view(1, 1, k))

    def ours(*s):
        return dino_loss(torch.cat(s), teacher_probs(torch.cat(teacher), center, t_t), len(s), t_s)

    def lightly_(*s):
        return peer(teacher, list(s), teacher_temp=t_t)

    assert_same(*both(ours, lightly_, *student))


@pytest.mark.parametrize("iterations", [1, 3])
def test_swav_sinkhorn_and_swapped_prediction_equal_lightly(iterations):
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    n_prototypes, n_high, n_low = 20, 2, 3
    scores = [randn(B, n_prototypes, seed=s).clamp(-1, 1) for s in range(n_high + n_low)]  # cosine scores
    codes_ours = sinkhorn(scores[0], 0.05, iterations)
    codes_peer = lightly_sinkhorn(scores[0], iterations=iterations, epsilon=0.05)
    torch.testing.assert_close(codes_ours.double(), codes_peer.double(), rtol=1e-5, atol=1e-7)

    peer = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=iterations, sinkhorn_epsilon=0.05)

    def ours(*s):
        stacked = torch.stack(s)  # (V, B, K)
        codes = torch.stack([sinkhorn(stacked[i].detach(), 0.05, iterations) for i in range(n_high)])
        return swapped_prediction_loss(stacked, codes, list(range(n_high)), 0.1)

    def lightly_(*s):
        return peer(list(s[:n_high]), list(s[n_high:])).squeeze()

    # sslhub's Sinkhorn shifts exp(s/ε) by each prototype's maximum (no overflow); the first row
    # normalisation cancels the shift, so the codes and the loss agree to float32 rounding
    assert_same(*both(ours, lightly_, *scores))
