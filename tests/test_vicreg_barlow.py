"""VICReg and Barlow Twins: every term against the papers' formulas written out element by element."""
import copy

import pytest
import torch

from sslhub.methods.barlow_twins import barlow_twins_loss, cross_correlation
from sslhub.methods.base import Batch
from sslhub.methods.registry import get_method
from sslhub.methods.vicreg import covariance_loss, variance_loss, vicreg_loss
from sslhub.train.optim import LARS, param_groups
from sslhub.train.recipe import recipe_from_dict

TINY_ENCODER = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}
TINY_HEAD = {"proj_hidden_dim": 32, "proj_dim": 16, "views": {"size": 16}, "views2": {"size": 16}}


# ----------------------------------------------------------------------------- written-out maths
def column_means(z):
    n, d = z.shape
    return [sum(z[k, j] for k in range(n)) / n for j in range(d)]


def covariance_loop(z):
    """C(Z)_ij = 1/(N-1) Σ_n (z_ni - z̄_i)(z_nj - z̄_j), one entry at a time."""
    n, d = z.shape
    m = column_means(z)
    return [[sum((z[k, i] - m[i]) * (z[k, j] - m[j]) for k in range(n)) / (n - 1) for j in range(d)] for i in range(d)]


def vicreg_loop(z1, z2, lam, mu, nu, gamma, eps):
    """VICReg eqs. (1)-(6) with the official code's halved variance term; returns (loss, s, v, c)."""
    n, d = z1.shape
    s = sum((z1[k, j] - z2[k, j]) ** 2 for k in range(n) for j in range(d)) / (n * d)

    def v(z):
        cov = covariance_loop(z)
        return sum(torch.clamp(gamma - torch.sqrt(cov[j][j] + eps), min=0) for j in range(d)) / d

    def c(z):
        cov = covariance_loop(z)
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    var, cov = (v(z1) + v(z2)) / 2, c(z1) + c(z2)
    return lam * s + mu * var + nu * cov, s, var, cov


def batch_normalize_loop(z, eps=1e-5):
    """ẑ_ni = (z_ni - z̄_i) / sqrt(biased Var_i + eps): a BN without affine parameters, in training mode."""
    n, d = z.shape
    m = column_means(z)
    var = [sum((z[k, j] - m[j]) ** 2 for k in range(n)) / n for j in range(d)]
    return torch.stack([torch.stack([(z[k, j] - m[j]) / torch.sqrt(var[j] + eps) for j in range(d)])
                        for k in range(n)])


def cross_correlation_loop(a, b):
    """C_ij = 1/N Σ_n a_ni b_nj (Barlow Twins eq. 2 on normalised embeddings)."""
    n, d = a.shape
    return [[sum(a[k, i] * b[k, j] for k in range(n)) / n for j in range(d)] for i in range(d)]


def barlow_loop(c, lambd):
    """L = Σ_i (1 - C_ii)² + λ Σ_i Σ_{j≠i} C_ij² (eq. 1); returns (loss, on, off)."""
    d = len(c)
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off, on, off


def hadamard_columns():
    """(4, 3): the non-constant columns of the 4x4 Hadamard matrix: mean 0, variance 1, uncorrelated."""
    return torch.tensor([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- VICReg
@pytest.mark.parametrize("lam,mu,nu,gamma,eps", [(25.0, 25.0, 1.0, 1.0, 1e-4), (1.0, 2.0, 3.0, 2.0, 1e-2)])
def test_vicreg_terms_match_written_out_maths(lam, mu, nu, gamma, eps):
    z1, z2 = randn(6, 5, seed=1) * 0.7, randn(6, 5, seed=2) * 1.3 + 0.5
    out = vicreg_loss(z1, z2, lam, mu, nu, gamma, eps)
    loss, s, var, cov = vicreg_loop(z1, z2, lam, mu, nu, gamma, eps)
    assert out["invariance"].item() == pytest.approx(s.item(), rel=1e-12)
    assert out["variance"].item() == pytest.approx(var.item(), rel=1e-12)
    assert out["covariance"].item() == pytest.approx(cov.item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-12)
    assert var.item() > 0 and cov.item() > 0  # both terms are exercised


def test_vicreg_gradient_matches_autograd_of_the_loop():
    a = (randn(5, 4, seed=3) * 0.5).requires_grad_()
    b = (randn(5, 4, seed=4) * 0.5).requires_grad_()
    vicreg_loss(a, b)["loss"].backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    vicreg_loop(a, b, 25.0, 25.0, 1.0, 1.0, 1e-4)[0].backward()
    assert torch.allclose(ga, a.grad, atol=1e-12) and torch.allclose(gb, b.grad, atol=1e-12)


def test_vicreg_is_invariant_to_permuting_the_batch():
    z1, z2 = randn(8, 6, seed=5), randn(8, 6, seed=6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    a, b = vicreg_loss(z1, z2), vicreg_loss(z1[perm], z2[perm])
    for k in ("loss", "invariance", "variance", "covariance"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-12), k


def test_variance_hinge_is_zero_above_gamma_and_positive_when_collapsed():
    h = hadamard_columns()  # unbiased variance 4/3 in every dimension
    assert variance_loss(h, gamma=1.0).item() == 0.0  # std 1.15 ≥ γ
    assert variance_loss(h, gamma=(4 / 3) ** 0.5).item() == 0.0  # std = γ exactly: sqrt(Var + ε) > γ
    assert variance_loss(h, gamma=1.5).item() == pytest.approx(1.5 - (4 / 3 + 1e-4) ** 0.5, rel=1e-12)
    assert variance_loss(3 * randn(16, 4, seed=7), gamma=1.0).item() == 0.0  # std ≈ 3 ≥ 1
    collapsed = randn(1, 4, seed=8).repeat(16, 1)  # every row the same: Var = 0
    assert variance_loss(collapsed, gamma=1.0, eps=1e-4).item() == pytest.approx(1 - 1e-2, rel=1e-12)  # γ − √ε
    # nearly collapsed: the hinge is active and its gradient step spreads the batch out
    z = (collapsed + 1e-3 * randn(16, 4, seed=9)).requires_grad_()
    v = variance_loss(z, gamma=1.0)
    assert v.item() > 0.9
    v.backward()
    assert bool(((z - 0.1 * z.grad).var(dim=0) > z.var(dim=0)).all())


def test_covariance_is_zero_when_decorrelated_and_the_formula_with_a_duplicated_column():
    h = hadamard_columns()
    assert covariance_loss(h).item() == pytest.approx(0.0, abs=1e-15)
    dup = torch.stack([h[:, 0], h[:, 0], h[:, 1]], dim=1) * 2.0  # columns 0 and 1 identical, var σ² = 4·4/3
    sigma2 = 4 * 4 / 3
    assert covariance_loss(dup).item() == pytest.approx(2 * sigma2 ** 2 / 3, rel=1e-12)  # C_01 = C_10 = σ², d = 3
    z = randn(7, 4, seed=10)
    cov = covariance_loop(z)
    off = sum(cov[i][j] ** 2 for i in range(4) for j in range(4) if i != j)
    assert covariance_loss(z).item() == pytest.approx(off.item() / 4, rel=1e-12)


# ----------------------------------------------------------------------------- Barlow Twins
def test_cross_correlation_matches_the_element_by_element_sum():
    a, b = randn(6, 4, seed=11), randn(6, 4, seed=12)
    c = cross_correlation(a, b)
    ref = cross_correlation_loop(a, b)
    for i in range(4):
        for j in range(4):
            assert c[i, j].item() == pytest.approx(ref[i][j].item(), rel=1e-12)


def test_barlow_loss_on_a_hand_made_matrix():
    c = torch.tensor([[0.5, 0.2, 0.0], [-0.1, 1.0, 0.3], [0.0, 0.4, 0.9]], dtype=torch.float64)
    on, off = 0.5 ** 2 + 0.0 + 0.1 ** 2, 0.2 ** 2 + 0.1 ** 2 + 0.3 ** 2 + 0.4 ** 2  # 0.26, 0.30
    for lambd in (0.0051, 0.5):
        out = barlow_twins_loss(c, lambd)
        assert out["on_diag"].item() == pytest.approx(on, rel=1e-12)
        assert out["off_diag"].item() == pytest.approx(off, rel=1e-12)
        assert out["loss"].item() == pytest.approx(on + lambd * off, rel=1e-12)
    r = randn(5, 5, seed=13)
    assert barlow_twins_loss(r, 0.0051)["loss"].item() == pytest.approx(barlow_loop(r, 0.0051)[0].item(), rel=1e-12)
    assert barlow_twins_loss(torch.eye(4), 0.0051)["loss"].item() == 0.0


def test_barlow_loss_is_zero_for_decorrelated_identical_embeddings():
    bn = torch.nn.BatchNorm1d(3, affine=False).double()  # the method's normalisation (ε = 1e-5)
    z = hadamard_columns() * 5.0 + 2.0  # any scale and offset: normalised along the batch to the Hadamard columns
    c = cross_correlation(bn(z), bn(z))
    assert torch.allclose(c, torch.eye(3, dtype=torch.float64), atol=1e-6)  # C_ii = 25 / (25 + ε)
    assert barlow_twins_loss(c, 0.0051)["loss"].item() == pytest.approx(0.0, abs=1e-11)
    # identical but redundant embeddings (a duplicated dimension) are penalised off the diagonal only
    dup = torch.stack([z[:, 0], z[:, 0], z[:, 1]], dim=1)
    out = barlow_twins_loss(cross_correlation(bn(dup), bn(dup)), 0.0051)
    assert out["on_diag"].item() == pytest.approx(0.0, abs=1e-11)
    assert out["off_diag"].item() == pytest.approx(2.0, rel=1e-5)  # C_01 = C_10 = 1


def test_barlow_normalisation_correlation_and_loss_match_the_loop_with_gradients():
    bn = torch.nn.BatchNorm1d(4, affine=False).double()
    a = randn(6, 4, seed=14).requires_grad_()
    b = (randn(6, 4, seed=15) + 0.5 * a.detach()).requires_grad_()
    out = barlow_twins_loss(cross_correlation(bn(a), bn(b)), 0.0051)
    loss, on, off = barlow_loop(cross_correlation_loop(batch_normalize_loop(a), batch_normalize_loop(b)), 0.0051)
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-10)
    assert out["on_diag"].item() == pytest.approx(on.item(), rel=1e-10)
    assert out["off_diag"].item() == pytest.approx(off.item(), rel=1e-10)
    out["loss"].backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    loss.backward()
    assert torch.allclose(ga, a.grad, atol=1e-10) and torch.allclose(gb, b.grad, atol=1e-10)


def test_barlow_is_invariant_to_permuting_the_batch():
    bn = torch.nn.BatchNorm1d(5, affine=False).double()
    z1, z2 = randn(8, 5, seed=16), randn(8, 5, seed=17)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    a = barlow_twins_loss(cross_correlation(bn(z1), bn(z2)))
    b = barlow_twins_loss(cross_correlation(bn(z1[perm]), bn(z2[perm])))
    for k in ("loss", "on_diag", "off_diag"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-12), k


# ----------------------------------------------------------------------------- the methods
def tiny(name, **args):
    r = recipe_from_dict({"method": name, "encoder": TINY_ENCODER, "method_args": {**TINY_HEAD, **args}})
    torch.manual_seed(0)
    return get_method(name).create(r.encoder, r.method_args)


def run_with_projector_outputs(method):
    """One loss() on 8 random images; returns the output dict and the projector's outputs (one per call)."""
    z = []
    method.projector.register_forward_hook(lambda mod, inp, out: z.append(out.detach().double()))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = method.loss(Batch(images, rng=torch.Generator().manual_seed(3)))
    return out, z


def test_vicreg_method_minimises_the_formula_of_its_two_views():
    m = tiny("vicreg", sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    out, z = run_with_projector_outputs(m)
    assert len(z) == 2 and z[0].shape == z[1].shape == (8, 16)  # one forward per view
    loss, s, var, cov = vicreg_loop(z[0], z[1], 2.0, 3.0, 4.0, 1.0, 1e-4)
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-4)
    for k, v in (("invariance", s), ("variance", var), ("covariance", cov)):
        assert out[k].item() == pytest.approx(v.item(), rel=1e-4), k
    assert out["loss"].requires_grad and 0 < out["z_std"].item() < 1


def test_barlow_method_minimises_the_formula_of_its_two_views():
    m = tiny("barlow_twins", lambd=0.02, scale_loss=0.5)
    out, z = run_with_projector_outputs(m)
    assert len(z) == 2 and z[0].shape == z[1].shape == (8, 16)
    c = cross_correlation_loop(batch_normalize_loop(z[0]), batch_normalize_loop(z[1]))  # each view on its own
    loss, on, off = barlow_loop(c, 0.02)
    assert out["loss"].item() == pytest.approx(0.5 * loss.item(), rel=1e-4)  # scale_loss · L
    assert out["on_diag"].item() == pytest.approx(on.item(), rel=1e-4)
    assert out["off_diag"].item() == pytest.approx(off.item(), rel=1e-4)
    assert out["c_diag"].item() == pytest.approx(sum(c[i][i] for i in range(16)).item() / 16, abs=1e-5)


def test_scale_loss_with_scaled_weight_decay_gives_the_papers_two_learning_rates():
    """Barlow Twins' LARS: lr 0.2 for weights, 0.0048 for biases/BN == one lr 0.2 on 0.024·L with wd × 0.024."""
    s, wd = 0.0048 / 0.2, 1.5e-6
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).double()
    paper, ours = net, copy.deepcopy(net)
    weights = [p for p in paper.parameters() if p.ndim > 1]
    biases = [p for p in paper.parameters() if p.ndim <= 1]
    opt_paper = LARS([{"params": weights, "weight_decay": wd, "lr": 0.2},
                      {"params": biases, "weight_decay": 0.0, "lars_exclude": True, "lr": 0.0048}], lr=0.2)
    opt_ours = LARS(param_groups(list(ours.parameters()), wd * s), lr=0.2, weight_decay=wd * s)
    for step in range(3):
        x = randn(8, 6, seed=20 + step)
        for model, opt, scale in ((paper, opt_paper, 1.0), (ours, opt_ours, s)):
            opt.zero_grad()
            (scale * model(x).pow(2).sum()).backward()
            opt.step()
    for (name, p), q in zip(paper.named_parameters(), ours.parameters()):
        assert torch.allclose(p, q, rtol=1e-8, atol=1e-10), name  # LARS ε = 1e-8 in the trust ratio


@pytest.mark.parametrize("name,field,value", [
    ("vicreg", "sim_coeff", -1.0), ("vicreg", "std_coeff", -25.0), ("vicreg", "cov_coeff", -1.0),
    ("vicreg", "gamma", 0.0), ("vicreg", "eps", 0.0), ("vicreg", "proj_dim", 0),
    ("barlow_twins", "lambd", -0.005), ("barlow_twins", "scale_loss", 0.0), ("barlow_twins", "proj_layers", 0),
])
def test_bad_config_is_refused_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=rf"method_args\.{field}\b"):
        tiny(name, **{field: value})
