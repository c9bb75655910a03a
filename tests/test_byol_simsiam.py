"""BYOL and SimSiam: losses against the papers' formulas written out sample by sample, the stop-gradient /
target network, BYOL's EMA on its cosine schedule, the collapse diagnostic and configuration errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslhub.methods.base import Batch
from sslhub.methods.byol import byol_loss, regression_loss
from sslhub.methods.common import normalized_std
from sslhub.methods.registry import get_method
from sslhub.methods.simsiam import negative_cosine, simsiam_loss
from sslhub.train.recipe import recipe_from_dict

ENCODER = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}
HEADS = {"byol": {"proj_hidden_dim": 32, "proj_dim": 8, "pred_hidden_dim": 32},
         "simsiam": {"proj_hidden_dim": 32, "proj_dim": 16, "proj_layers": 2, "pred_hidden_dim": 8}}
VIEW_FIELDS = {"byol": ["views", "views_prime"], "simsiam": ["views"]}


def make(name, **args):
    views = {f: {"size": 16} for f in VIEW_FIELDS[name]}
    r = recipe_from_dict({"method": name, "encoder": ENCODER, "method_args": {**HEADS[name], **views, **args}})
    torch.manual_seed(0)
    return get_method(name).create(r.encoder, r.method_args)


def images(n=8, seed=1):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def batch(seed=0, step=0):
    return Batch(images(), rng=torch.Generator().manual_seed(seed), step=step)


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rows(*ts):
    return [t.double().tolist() for t in ts]


def random_pairs(seed, n=7, d=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for _ in range(4)]


# ----------------------------------------------------------------------------- BYOL loss
def byol_loop(q1, q2, z1, z2):
    """Eq. 2 & 3: per sample 2 - 2 cos(q, z') for (q1, z2) and (q2, z1), summed, mean over the batch."""
    q1, q2, z1, z2 = rows(q1, q2, z1, z2)
    return sum((2 - 2 * cos(q1[i], z2[i])) + (2 - 2 * cos(q2[i], z1[i])) for i in range(len(q1))) / len(q1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_loss_matches_written_out_maths(seed):
    q1, q2, z1, z2 = random_pairs(seed)
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(byol_loop(q1, q2, z1, z2), rel=1e-5)
    # eq. 2 in its first form: the squared distance of the L2-normalised vectors
    dist = ((F.normalize(q1.double(), dim=1) - F.normalize(z2.double(), dim=1)) ** 2).sum(1)
    assert torch.allclose(regression_loss(q1, z2).double(), dist, atol=1e-6)


def test_byol_loss_bounds():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    assert byol_loss(2 * z, 3 * z, z, z).item() == pytest.approx(0.0, abs=1e-6)  # same directions
    assert byol_loss(-z, -z, z, z).item() == pytest.approx(8.0, rel=1e-6)  # opposite directions


def test_byol_loss_has_no_gradient_into_the_targets():
    q1, q2, z1, z2 = (t.requires_grad_() for t in random_pairs(4))
    gq1, gq2, gz1, gz2 = torch.autograd.grad(byol_loss(q1, q2, z1, z2), [q1, q2, z1, z2], allow_unused=True)
    assert gz1 is None and gz2 is None
    assert gq1.abs().sum() > 0 and gq2.abs().sum() > 0


def test_byol_method_loss_is_the_written_out_forward():
    m = make("byol")
    out = m.loss(batch(seed=5))
    g = torch.Generator().manual_seed(5)  # the same views again: v = t(x) then v' = t'(x)
    v1, v2 = m.augment(images(), g), m.augment_prime(images(), g)
    with torch.no_grad():
        q1, q2 = (m.predictor(m.projector(m.backbone(v))) for v in (v1, v2))
        t1, t2 = (m.target_projector(m.target_backbone(v)) for v in (v1, v2))
    assert out["loss"].item() == pytest.approx(byol_loop(q1, q2, t1, t2), rel=1e-5)


def test_byol_first_view_is_t_and_second_is_t_prime():
    deterministic = {"size": 16, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0,
                     "gray_p": 0.0}
    m = make("byol", views=deterministic, views_prime={**deterministic, "solarize_p": 1.0})
    v1, v2 = m.views(batch())
    mean, std = m.augment.mean.view(1, 3, 1, 1), m.augment.std.view(1, 3, 1, 1)
    x1 = v1 * std + mean  # T: the image itself
    assert torch.allclose(x1, images().float() / 255, atol=1e-5)
    expected = (torch.where(x1 >= 0.5, 1 - x1, x1) - mean) / std  # T': solarised at 0.5
    assert torch.allclose(v2, expected, atol=1e-5)


def test_byol_gradients_reach_the_online_network_only():
    m = make("byol")
    m.loss(batch())["loss"].backward()
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    assert target and all(not p.requires_grad and p.grad is None for p in target)
    for net in (m.backbone, m.projector, m.predictor):
        assert all(p.grad is not None for p in net.parameters())
        assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0
    optimised = {id(p) for p in m.optim_groups()["loss"]}
    assert not optimised & {id(p) for p in target}


def test_byol_target_stays_frozen_after_global_batchnorm_conversion():
    from sslhub.distributed import GlobalBatchNorm

    m = make("byol")
    m.convert_batchnorm()  # what the trainer does with several processes
    assert any(isinstance(mod, GlobalBatchNorm) for mod in m.target_projector.modules())
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    assert all(not p.requires_grad for p in target)
    assert not {id(p) for p in m.optim_groups()["loss"]} & {id(p) for p in target}


# ----------------------------------------------------------------------------- BYOL target network
def perturb_online(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(m.backbone.parameters()) + list(m.projector.parameters()):
            p.add_(torch.randn(p.shape, generator=g))


def target_and_online(m):
    t = [p.detach().clone() for p in list(m.target_backbone.parameters()) + list(m.target_projector.parameters())]
    o = [p.detach().clone() for p in list(m.backbone.parameters()) + list(m.projector.parameters())]
    return t, o


@pytest.mark.parametrize("step, tau", [
    (0, 0.996),  # start of the schedule: τ_base
    (3, 1 - 0.004 * (math.cos(math.pi * 3 / 10) + 1) / 2),  # 1 − (1 − τ_base)(cos(πk/K) + 1)/2
    (5, 0.998),  # half-way: (1 + τ_base)/2
    (10, 1.0),  # end: the target stops moving
])
def test_byol_target_follows_the_ema_with_the_cosine_momentum(step, tau):
    m = make("byol", tau_base=0.996)
    m.configure(steps_per_epoch=2, max_steps=10)
    perturb_online(m)
    before, online = target_and_online(m)
    assert m.loss(batch(step=step))["momentum"].item() == pytest.approx(tau, abs=1e-7)  # the logged τ
    m.on_step_end(step, 10)
    after, _ = target_and_online(m)
    for t0, o, t1 in zip(before, online, after):
        assert torch.allclose(t1, tau * t0 + (1 - tau) * o, rtol=1e-6, atol=1e-7)
    moved = max(float((t1 - t0).abs().max()) for t0, t1 in zip(before, after))
    assert (moved == 0) == (tau == 1.0)


def test_byol_target_never_moves_with_momentum_one():
    m = make("byol", tau_base=1.0)
    m.configure(steps_per_epoch=1, max_steps=3)
    before, online0 = target_and_online(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for s in range(3):
        m.loss(batch(seed=s, step=s))["loss"].backward()
        opt.step()
        opt.zero_grad()
        m.on_step_end(s, 3)
    after, online = target_and_online(m)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert any(not torch.equal(a, b) for a, b in zip(online0, online))  # while the online network trains


def test_byol_momentum_outside_the_trainer_is_tau_base():
    m = make("byol", tau_base=0.99)  # no configure(): the schedule has not started
    assert m.loss(batch(step=7))["momentum"].item() == pytest.approx(0.99)


# ----------------------------------------------------------------------------- SimSiam loss
def simsiam_loop(p1, p2, z1, z2):
    """Eq. 1, 3, 4: ½ D(p1, z2) + ½ D(p2, z1) with D = −cosine, mean over the batch."""
    p1, p2, z1, z2 = rows(p1, p2, z1, z2)
    return sum(-0.5 * cos(p1[i], z2[i]) - 0.5 * cos(p2[i], z1[i]) for i in range(len(p1))) / len(p1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simsiam_loss_matches_written_out_maths(seed):
    p1, p2, z1, z2 = random_pairs(seed)
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(simsiam_loop(p1, p2, z1, z2), rel=1e-5)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    assert simsiam_loss(z, 2 * z, z, z).item() == pytest.approx(-1.0, rel=1e-6)  # the minimum


def test_simsiam_no_gradient_through_the_stop_gradient_branch():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 4, generator=g, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g, requires_grad=True)
    h = nn.Linear(4, 4)
    term = negative_cosine(h(z1), z2).mean()  # D(p1, stopgrad(z2))
    g1, g2 = torch.autograd.grad(term, [z1, z2], allow_unused=True)
    assert g2 is None or float(g2.abs().sum()) == 0.0  # z2 is the stop-gradient target
    assert float(g1.abs().sum()) > 0  # z1 gets its gradient through the predictor


def test_simsiam_method_loss_and_gradient_are_the_written_out_ones():
    m = make("simsiam")
    out = m.loss(batch(seed=3))
    out["loss"].backward()
    grads = [p.grad.clone() for p in m.backbone.parameters()]
    m.zero_grad()
    g = torch.Generator().manual_seed(3)
    x1, x2 = m.augment(images(), g), m.augment(images(), g)

    def forward(stop_gradient):
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        d = lambda p, z: -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)  # noqa: E731
        return (0.5 * d(p1, t2) + 0.5 * d(p2, t1)).mean(), (p1, p2, z1, z2)

    ref, heads = forward(stop_gradient=True)
    assert out["loss"].item() == pytest.approx(simsiam_loop(*(t.detach() for t in heads)), rel=1e-5)
    ref.backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7) for a, p in zip(grads, m.backbone.parameters()))
    m.zero_grad()
    forward(stop_gradient=False)[0].backward()  # without the stop-gradient the gradient differs
    assert not all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7) for a, p in zip(grads, m.backbone.parameters()))


def test_simsiam_heads_have_the_paper_shape():
    m = make("simsiam", proj_layers=3)
    linears = [mod for mod in m.projector if isinstance(mod, nn.Linear)]
    bns = [mod for mod in m.projector if isinstance(mod, nn.BatchNorm1d)]
    assert len(linears) == 3 and len(bns) == 3  # BN after every Linear, the output one included
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine
    assert [type(mod) for mod in m.predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (m.predictor[0].in_features, m.predictor[0].out_features, m.predictor[3].out_features) == (16, 8, 16)


# ----------------------------------------------------------------------------- both
def test_normalized_std_detects_collapse():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 64, generator=g)
    assert normalized_std(spread).item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.randn(1, 64, generator=g).expand(4096, 64) * torch.rand(4096, 1, generator=g)
    assert normalized_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_loss_dict_reports_z_std_of_the_projections(name):
    m = make(name)
    out = m.loss(batch())
    assert set(out) >= {"loss", "z_std"} and not out["z_std"].requires_grad
    assert 0 < out["z_std"].item() <= 1


@pytest.mark.parametrize("name, args, field", [
    ("byol", {"tau_base": 1.5}, "tau_base"),
    ("byol", {"tau_base": -0.1}, "tau_base"),
    ("byol", {"proj_dim": 0}, "proj_dim"),
    ("byol", {"pred_hidden_dim": -4}, "pred_hidden_dim"),
    ("simsiam", {"proj_layers": 0}, "proj_layers"),
    ("simsiam", {"pred_hidden_dim": 0}, "pred_hidden_dim"),
])
def test_bad_config_names_the_field(name, args, field):
    with pytest.raises(ValueError, match=rf"method_args\.{field}="):
        make(name, **args)
