import math

import pytest
import torch
import torch.nn.functional as F

from sslhub.methods.simclr import nt_xent


def nt_xent_loop(z1, z2, t):
    """NT-Xent written out as in the paper's Algorithm 1: l(i, j) over all 2N anchors."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n)]
        den = sum(s for k, s in enumerate(sims) if k != i)
        total += -math.log(sims[j] / den)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_written_out_loop(t):
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    z2 = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_random():
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(16, 32, generator=g), dim=1)
    same = nt_xent(z, z, 0.1).item()
    rnd = nt_xent(z, F.normalize(torch.randn(16, 32, generator=g), dim=1), 0.1).item()
    assert same < 0.1 < math.log(31) - 1 < rnd


def test_nt_xent_gradient_matches_autograd_of_loop():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z1, z2 = F.normalize(a, dim=1), F.normalize(b, dim=1)
    nt_xent(z1, z2, 0.5).backward()
    ga = a.grad.clone()
    a.grad = None
    z = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])
    n = 4
    sim = z @ z.T / 0.5
    loss = 0
    for i in range(2 * n):
        mask = torch.ones(2 * n, dtype=torch.bool)
        mask[i] = False
        loss = loss - (sim[i, (i + n) % (2 * n)] - torch.logsumexp(sim[i][mask], 0))
    (loss / (2 * n)).backward()
    assert torch.allclose(ga, a.grad, atol=1e-10)
