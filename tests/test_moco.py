"""MoCo v2 and v3 against written-out maths: InfoNCE with a queue, ctr with its 2τ factor, the FIFO
queue, shuffling BN, the momentum encoders' EMA and schedule, the ViT patch-projection freeze, config errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sslhub.distributed as D
from sslhub.methods.base import Batch
from sslhub.methods.common import cosine_momentum
from sslhub.methods.moco_v2 import infonce_queue, shuffle_bn_forward
from sslhub.methods.moco_v3 import ctr_loss
from sslhub.methods.registry import get_method
from sslhub.train.recipe import recipe_from_dict

TINY_RESNET = {"arch": "resnet18", "cifar_stem": True, "image_size": 16, "model_args": {"channels": [8, 16, 16, 16]}}
TINY_VIT = {"arch": "vit_tiny_patch16_224", "image_size": 16,
            "model_args": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}
SMALL_V3 = {"proj_hidden_dim": 64, "proj_dim": 16, "pred_hidden_dim": 64}


def make(name, encoder=TINY_RESNET, **args):
    views = {"views": {"size": 16}}  # the rest of each view: the method's defaults (blur, solarisation …)
    if name == "moco_v3":
        views["views2"] = {"size": 16}
    r = recipe_from_dict({"method": name, "encoder": encoder, "method_args": {**views, **args}})
    torch.manual_seed(0)
    return get_method(name).create(r.encoder, r.method_args)


def images(n=8, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


# ----------------------------------------------------------------------------- the losses
def infonce_loop(q, k, queue, t):
    """MoCo v1 eq. 1 per query: −log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_j exp(q·k_j/τ)), averaged."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_infonce_queue_matches_written_out_loop(t):
    q, k, queue = unit(5, 8, 0), unit(5, 8, 1), unit(11, 8, 2)
    loss, logits = infonce_queue(q, k, queue, t)
    assert loss.item() == pytest.approx(infonce_loop(q, k, queue, t), rel=1e-10)
    assert logits.shape == (5, 12)
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / t)  # column 0 is the positive


def test_infonce_queue_gradient_matches_autograd_of_loop():
    a = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    k, queue = unit(4, 6, 4), unit(7, 6, 5)
    infonce_queue(F.normalize(a, dim=1), k, queue, 0.2)[0].backward()
    got, a.grad = a.grad.clone(), None
    q = F.normalize(a, dim=1)
    loss = sum(-(q[i] @ k[i] / 0.2 - torch.logsumexp(torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / 0.2, 0))
               for i in range(4)) / 4
    loss.backward()
    assert torch.allclose(got, a.grad, atol=1e-12)


def ctr_loop(q, k, t, offset):
    """MoCo v3 Algorithm 1: 2τ · mean_i −log softmax(q_i·kᵀ/τ)[offset + i], q and k normalised first."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        sims = [math.exp(float(q[i] @ k[j]) / t) for j in range(k.shape[0])]
        total += -math.log(sims[offset + i] / sum(sims))
    return 2 * t * total / q.shape[0]


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_ctr_matches_written_out_loop_with_the_2tau_factor(t):
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    loss, _ = ctr_loss(q, k, t)
    assert loss.item() == pytest.approx(ctr_loop(q, k, t, 0), rel=1e-6)
    assert loss.item() != pytest.approx(ctr_loop(q, k, t, 0) / (2 * t), rel=1e-3)  # the factor is there


def test_ctr_labels_are_this_process_rows_of_the_global_keys(monkeypatch):
    """On rank 1 of 2, query i's positive is global key B + i."""
    g = torch.Generator().manual_seed(7)
    q, k_all = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    monkeypatch.setattr(D, "rank", lambda: 1)
    loss, logits = ctr_loss(q, k_all, 0.2)
    assert logits.shape == (3, 6)
    assert loss.item() == pytest.approx(ctr_loop(q, k_all, 0.2, 3), rel=1e-6)


# ----------------------------------------------------------------------------- MoCo v2: queue and shuffling BN
def test_enqueue_writes_at_the_pointer_and_wraps():
    m = make("moco_v2", queue_size=6, proj_dim=4)
    before = m.queue.clone()
    a, b = unit(4, 4, 8).float(), unit(4, 4, 9).float()
    m.enqueue(a)
    assert torch.equal(m.queue[:4], a) and torch.equal(m.queue[4:], before[4:]) and m.queue_ptr.item() == 4
    m.enqueue(b)  # rows 4, 5 then wraps to 0, 1
    assert torch.equal(m.queue[4:], b[:2]) and torch.equal(m.queue[:2], b[2:]) and torch.equal(m.queue[2:4], a[2:])
    assert m.queue_ptr.item() == 2
    with pytest.raises(ValueError, match="method_args.queue_size"):
        m.enqueue(unit(7, 4, 10).float())


def group_forward(net, x, perm, groups):
    """Shuffling BN written out: the permuted batch in ``groups`` separate forwards, then un-permuted."""
    shuffled = x[perm]
    size = x.shape[0] // groups
    out = torch.cat([net(shuffled[i * size:(i + 1) * size]) for i in range(groups)])
    return out[torch.argsort(perm)]


def test_shuffle_bn_forward_equals_a_manual_permuted_per_group_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    got = shuffle_bn_forward(net, x, 4, torch.Generator().manual_seed(11))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(got, group_forward(net, x, perm, 4), atol=1e-6)
    # BN statistics are the group's: neither the whole batch nor unshuffled groups give these keys
    assert not torch.allclose(got, net(x), atol=1e-3)
    assert not torch.allclose(got, group_forward(net, x, torch.arange(8), 4), atol=1e-3)
    with pytest.raises(ValueError, match="method_args.bn_groups"):
        shuffle_bn_forward(net, x, 3, torch.Generator())


@pytest.mark.parametrize("symmetric", [False, True])
def test_v2_loss_uses_the_old_queue_and_enqueues_the_batch_keys(symmetric):
    m = make("moco_v2", queue_size=24, bn_groups=4, symmetric=symmetric)
    x, old = images(), m.queue.clone()
    key_bn = m.key_backbone.model.bn1
    key_stats = key_bn.running_mean.clone()
    out = m.loss(Batch(x, rng=torch.Generator().manual_seed(3), step=5))

    g = torch.Generator().manual_seed(3)
    x1, x2 = m.augment(x, g), m.augment(x, g)
    perms = torch.Generator().manual_seed(5)  # the step's shuffle: one permutation per key view
    with torch.no_grad():
        def key(v):
            return F.normalize(group_forward(lambda c: m.key_projector(m.key_backbone(c)), v,
                                             torch.randperm(8, generator=perms), 4), dim=1)
        k2 = key(x2)
        k1 = key(x1) if symmetric else None
        q1 = F.normalize(m.projector(m.backbone(x1)), dim=1)
        q2 = F.normalize(m.projector(m.backbone(x2)), dim=1)
    expected = infonce_loop(q1, k2, old, 0.2)
    if symmetric:
        expected += infonce_loop(q2, k1, old, 0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert torch.equal(m.queue, old)  # the queue changes after the optimiser step, not in loss()
    m.on_step_end(5, 10)
    new = torch.cat([k1, k2]) if symmetric else k2
    n = new.shape[0]
    assert torch.allclose(m.queue[:n], new, atol=1e-5)
    assert torch.equal(m.queue[n:], old[n:]) and m.queue_ptr.item() == n
    assert torch.equal(key_bn.running_mean, key_stats)  # the key encoder keeps no running statistics
    m.eval()
    m.loss(Batch(x, rng=torch.Generator().manual_seed(4), step=6))
    m.on_step_end(6, 10)
    assert m.queue_ptr.item() == n  # nothing is enqueued outside training


def test_v2_convert_batchnorm_keeps_the_key_encoder_local():
    m = make("moco_v2")
    m.convert_batchnorm()
    bns = lambda mod: [b for b in mod.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]  # noqa: E731
    assert bns(m.backbone) and all(isinstance(b, D.GlobalBatchNorm) for b in bns(m.backbone))
    assert bns(m.key_backbone) and not any(isinstance(b, D.GlobalBatchNorm) for b in bns(m.key_backbone))


def test_v3_convert_batchnorm_is_global_and_keeps_the_momentum_encoder_frozen():
    m = make("moco_v3", **SMALL_V3)
    m.convert_batchnorm()
    for net in (m.backbone, m.projector, m.predictor, m.momentum_backbone, m.momentum_projector):
        assert all(isinstance(b, D.GlobalBatchNorm) for b in net.modules()
                   if isinstance(b, nn.modules.batchnorm._BatchNorm))
    assert not any(p.requires_grad for p in [*m.momentum_backbone.parameters(), *m.momentum_projector.parameters()])


# ----------------------------------------------------------------------------- momentum encoders
@pytest.mark.parametrize("name,args", [("moco_v2", {"momentum": 0.9}), ("moco_v3", {**SMALL_V3, "momentum": 0.9})])
def test_key_encoder_gets_no_gradient_and_moves_by_the_ema_formula(name, args):
    m = make(name, **args)
    online = [m.backbone, m.projector]
    target = [m.key_backbone, m.key_projector] if name == "moco_v2" else [m.momentum_backbone, m.momentum_projector]
    target_params = [p for t in target for p in t.parameters()]
    trained = {id(p) for p in m.optim_groups()["loss"]}
    assert not any(p.requires_grad or id(p) in trained for p in target_params)
    m.loss(Batch(images(), rng=torch.Generator().manual_seed(0), step=2))["loss"].backward()
    assert all(p.grad is None for p in target_params)
    with torch.no_grad():  # a stand-in for the optimiser step
        for p in m.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    old = [p.clone() for p in target_params]
    m.on_step_end(2, 10)
    mom = 0.9 if name == "moco_v2" else cosine_momentum(0.9, 2, 10)
    new_online = [p for o in online for p in o.parameters()]
    assert any(not torch.equal(o, p) for o, p in zip(old, new_online))  # online and target differ now
    for t_old, t_new, o in zip(old, target_params, new_online):
        assert torch.allclose(t_new, mom * t_old + (1 - mom) * o, atol=1e-7)


def test_v3_momentum_follows_the_cosine_schedule():
    m = make("moco_v3", **SMALL_V3)
    assert m.momentum(7) == 0.99  # outside the trainer (no max_steps) the schedule has not started
    m.configure(steps_per_epoch=5, max_steps=20)
    for k in range(21):
        assert m.momentum(k) == pytest.approx(1 - (1 - 0.99) * (math.cos(math.pi * k / 20) + 1) / 2, abs=1e-12)
    assert m.momentum(0) == pytest.approx(0.99) and m.momentum(20) == pytest.approx(1.0)
    assert m.momentum(10) == pytest.approx(0.995)
    out = m.loss(Batch(images(), rng=torch.Generator().manual_seed(0), step=5))
    assert out["momentum"].item() == pytest.approx(m.momentum(5))


def test_v3_loss_is_ctr_q1_k2_plus_ctr_q2_k1():
    m = make("moco_v3", **SMALL_V3)
    x = images()
    out = m.loss(Batch(x, rng=torch.Generator().manual_seed(2), step=0))
    g = torch.Generator().manual_seed(2)
    x1, x2 = m.augment1(x, g), m.augment2(x, g)
    with torch.no_grad():
        q1, q2 = (m.predictor(m.projector(m.backbone(v))) for v in (x1, x2))
        k1, k2 = (m.momentum_projector(m.momentum_backbone(v)) for v in (x1, x2))
    assert out["loss"].item() == pytest.approx(ctr_loop(q1, k2, 0.2, 0) + ctr_loop(q2, k1, 0.2, 0), rel=1e-4)


def test_v3_heads_have_the_papers_shape():
    m = make("moco_v3", proj_hidden_dim=64, proj_dim=16, pred_hidden_dim=32)
    linears = [mod for mod in m.projector if isinstance(mod, nn.Linear)]
    assert [lin.out_features for lin in linears] == [64, 64, 16] and all(lin.bias is None for lin in linears)
    last = m.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine  # BN on the output, without γ, β
    assert isinstance(m.predictor[-1], nn.BatchNorm1d) and m.predictor[0].out_features == 32
    no_bn = make("moco_v3", proj_hidden_dim=64, proj_dim=16, pred_hidden_dim=32, proj_layers=2, pred_last_bn=False)
    assert isinstance(no_bn.predictor[-1], nn.Linear)
    assert len([x for x in no_bn.projector if isinstance(x, nn.Linear)]) == 2


# ----------------------------------------------------------------------------- ViT
@pytest.mark.parametrize("freeze", [True, False])
def test_v3_vit_patch_projection_is_frozen(freeze):
    m = make("moco_v3", encoder=TINY_VIT, freeze_patch_embed=freeze, **SMALL_V3)
    patch = list(m.backbone.model.patch_embed.parameters())
    assert patch and all(p.requires_grad != freeze for p in patch)
    trained = {id(p) for p in m.optim_groups()["loss"]}
    assert all((id(p) in trained) != freeze for p in patch)
    out = m.loss(Batch(images(), rng=torch.Generator().manual_seed(0), step=0))
    assert math.isfinite(out["loss"].item())
    out["loss"].backward()
    assert all((p.grad is None) == freeze for p in patch)
    blocks = list(m.backbone.model.blocks.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks)


# ----------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("name,field,value", [
    ("moco_v2", "temperature", 0.0), ("moco_v2", "queue_size", 0), ("moco_v2", "momentum", 1.5),
    ("moco_v2", "bn_groups", 0), ("moco_v2", "proj_dim", 0),
    ("moco_v3", "temperature", -0.2), ("moco_v3", "momentum", -0.1), ("moco_v3", "proj_layers", 0),
    ("moco_v3", "pred_hidden_dim", 0),
])
def test_bad_config_raises_naming_the_field(name, field, value):
    with pytest.raises(ValueError, match=f"method_args.{field}"):
        make(name, **{field: value})


def test_bn_groups_must_be_a_multiple_of_the_processes(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 2)
    m = make("moco_v2", bn_groups=3)  # the number of processes is known when the trainer configures the method
    with pytest.raises(ValueError, match=r"method_args.bn_groups=3 must be a multiple of the number of processes"):
        m.configure(steps_per_epoch=10, max_steps=100)


def test_batch_that_does_not_fit_the_groups_or_the_queue_raises():
    with pytest.raises(ValueError, match="method_args.bn_groups=3"):
        make("moco_v2", bn_groups=3).loss(Batch(images(), rng=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="method_args.queue_size=8 is smaller than the 16 keys"):
        make("moco_v2", queue_size=8, symmetric=True).loss(Batch(images(), rng=torch.Generator().manual_seed(0)))
