import math

import pytest
import torch
import torch.nn.functional as F

from sslhub.methods.base import Batch
from sslhub.methods.dino import DINO, dino_loss, teacher_probs
from sslhub.train.recipe import recipe_from_dict


def make(n_local=3, views=None, **args) -> DINO:
    """A tiny DINO: ResNet-18 with 8–16 channels on 16-px images, 16-px global and 8-px local crops."""
    views = views or {}
    method_args = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local_views": n_local,
                   "views": {"size": 16, **views}, "views2": {"size": 16, **views},
                   "local_views": {"size": 8, **views}, **args}
    r = recipe_from_dict({"method": "dino", "method_args": method_args,
                          "encoder": {"arch": "resnet18", "cifar_stem": True, "image_size": 16,
                                      "model_args": {"channels": [8, 16, 16, 16]}}})
    torch.manual_seed(0)
    return DINO.create(r.encoder, r.method_args)


def batch(step=0, n=6, seed=0):
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    return Batch(images, rng=torch.Generator().manual_seed(seed), step=step)


def softmax_row(x):
    e = [math.exp(v - max(x)) for v in x]
    return [v / sum(e) for v in e]


def dino_loss_loop(student, teacher, center, n_crops, t_s, t_t):
    """The paper's Algorithm 1 written out: every (teacher global crop i, student crop j ≠ i) pair and
    every sample b, H(a, b) = −Σ_k a_k log b_k, averaged over pairs and samples."""
    s, t, c = student.double().tolist(), teacher.double().tolist(), center.double().tolist()
    b = len(s) // n_crops
    n_global = len(t) // b
    total, terms = 0.0, 0
    for i in range(n_global):
        for j in range(n_crops):
            if j == i:
                continue
            pair = 0.0
            for n in range(b):
                p_t = softmax_row([(v - ck) / t_t for v, ck in zip(t[i * b + n], c)])
                p_s = softmax_row([v / t_s for v in s[j * b + n]])
                pair += -sum(a * math.log(q) for a, q in zip(p_t, p_s))
            total += pair / b
            terms += 1
    return total / terms


@pytest.mark.parametrize("n_crops,t_s,t_t", [(2, 0.1, 0.04), (5, 0.1, 0.07), (4, 0.5, 1.0)])
def test_loss_matches_written_out_double_loop(n_crops, t_s, t_t):
    g = torch.Generator().manual_seed(n_crops)
    b, k = 3, 7
    student = torch.randn(n_crops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    center = 0.3 * torch.randn(k, generator=g)
    got = dino_loss(student, teacher_probs(teacher, center, t_t), n_crops, t_s)
    assert got.item() == pytest.approx(dino_loss_loop(student, teacher, center, n_crops, t_s, t_t), rel=1e-5)


def test_loss_gradient_matches_autograd_of_loop():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4 * 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2 * 2, 5, generator=g, dtype=torch.float64)
    dino_loss(s, teacher_probs(t, torch.zeros(5), 0.04), 4, 0.1).backward()
    got, s.grad = s.grad.clone(), None
    loss, log_s = 0, F.log_softmax(s / 0.1, dim=1).chunk(4)
    for i, p in enumerate(F.softmax(t / 0.04, dim=1).chunk(2)):
        for j in range(4):
            if j != i:
                loss = loss - (p * log_s[j]).sum(1).mean()
    (loss / 6).backward()
    assert torch.allclose(got, s.grad, atol=1e-12)


def test_centring_and_sharpening_as_the_formula_says():
    t = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, -1.0]])
    c = torch.tensor([2.0, 0.0, 0.0])
    p = teacher_probs(t, c, 0.5)
    for row, got in zip(t.tolist(), p):
        want = softmax_row([(v - ck) / 0.5 for v, ck in zip(row, c.tolist())])
        assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert p[0].argmax() == 1  # centring moved the winner away from the dimension the centre holds high
    assert teacher_probs(t, torch.zeros(3), 0.5)[0].argmax() == 0
    # Centring on the row itself gives the uniform distribution; a lower temperature sharpens.
    assert torch.allclose(teacher_probs(t[:1], t[0], 0.04), torch.full((1, 3), 1 / 3))
    ent = [float(-(q * q.log()).sum()) for q in (teacher_probs(t, c, tt)[1] for tt in (1.0, 0.1, 0.04))]
    assert ent[0] > ent[1] > ent[2]


def test_method_loss_wires_crops_centre_and_temperature():
    """method.loss = the written-out loss on the student's outputs of all crops and the teacher's outputs
    of the two global crops, with the current centre and teacher temperature (eval-mode BN, so per-crop
    forwards equal the grouped ones)."""
    m = make(n_local=2, warmup_teacher_temp=0.04, teacher_temp=0.08, warmup_teacher_temp_epochs=2)
    m.configure(steps_per_epoch=5, max_steps=50)
    m.center.copy_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():  # a teacher different from the student
        for p in list(m.teacher_backbone.parameters()) + list(m.teacher_head.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m.eval()
    out = m.loss(batch(step=5))
    crops = m.crops(batch(step=5))
    assert [tuple(x.shape) for x in crops] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 2
    with torch.no_grad():
        s = torch.cat([m.head(m.backbone(x)) for x in crops])
        t = torch.cat([m.teacher_head(m.teacher_backbone(x)) for x in crops[:2]])
    assert out["teacher_temp"].item() == pytest.approx(0.06)  # step 5 of a 10-step warm-up 0.04 → 0.08
    want = dino_loss_loop(s, t, m.center, 4, 0.1, 0.06)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    p_t = F.softmax((t.double() - m.center.double()) / 0.06, dim=1)
    entropy = float(-(p_t * p_t.log()).sum(1).mean())
    assert out["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-4)
    assert out["kl"].item() == pytest.approx(want - entropy, rel=1e-4, abs=1e-5)


def teacher_outputs(m):
    """Capture every teacher-head output of the next loss() calls."""
    seen = []
    m.teacher_head.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    return seen


def test_centre_update_is_ema_of_the_batch_mean_after_the_loss():
    m = make(n_local=1)
    seen = teacher_outputs(m)
    c0 = 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(5))
    m.center.copy_(c0)
    m.loss(batch(seed=1))
    assert torch.equal(m.center, c0)  # the loss of a step uses the centre of the previous step
    m.on_step_end(0, 10)
    assert seen[0].shape == (12, 64)  # 2 global crops x 6 images
    c1 = 0.9 * c0 + 0.1 * seen[0].mean(0)
    assert torch.allclose(m.center, c1, atol=1e-6)
    # Two micro-batches (gradient accumulation) before one step: the mean over both.
    m.loss(batch(seed=2, n=4))
    m.loss(batch(seed=3, n=6))
    m.on_step_end(1, 10)
    c2 = 0.9 * c1 + 0.1 * torch.cat(seen[1:]).mean(0)
    assert torch.allclose(m.center, c2, atol=1e-6)
    assert "center" in m.state_dict()  # survives --resume


def test_teacher_temperature_schedule():
    m = make(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    assert m.teacher_temperature(0) == 0.07  # steps_per_epoch unknown: the warm-up counts as finished
    m.configure(steps_per_epoch=10, max_steps=1000)
    assert m.teacher_temperature(0) == pytest.approx(0.04)
    assert m.teacher_temperature(150) == pytest.approx(0.055)  # middle of the 300-step warm-up
    assert m.teacher_temperature(225) == pytest.approx(0.0625)
    assert m.teacher_temperature(300) == pytest.approx(0.07)
    assert m.teacher_temperature(999) == pytest.approx(0.07)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_gets_no_gradient_during_the_first_epoch(norm_last_layer):
    m = make(n_local=1, norm_last_layer=norm_last_layer)
    last = [m.head.last_layer.weight_v] + ([] if norm_last_layer else [m.head.last_layer.weight_g])
    m.loss(batch(step=0))["loss"].backward()  # no configure(): not frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last)
    m.configure(steps_per_epoch=3, max_steps=30)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.04)
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        m.loss(batch(step=step))["loss"].backward()
        before = [p.detach().clone() for p in last]
        mlp = m.head.mlp[0].weight.detach().clone()
        frozen = step < 3
        assert all((p.grad is None) == frozen for p in last), f"step {step}"
        assert m.head.mlp[0].weight.grad.abs().sum() > 0
        opt.step()
        assert all(torch.equal(p, b) == frozen for p, b in zip(last, before)), f"step {step}"
        assert not torch.equal(m.head.mlp[0].weight, mlp)


def test_teacher_moves_exactly_by_the_ema_formula_and_gets_no_gradient():
    m = make(n_local=1, momentum_teacher=0.9)
    teacher = list(m.teacher_backbone.parameters()) + list(m.teacher_head.parameters())
    student = list(m.backbone.parameters()) + list(m.head.parameters())
    assert all(not p.requires_grad for p in teacher)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for step, max_steps in ((0, 4), (1, 4)):
        t_old = [p.detach().clone() for p in teacher]
        m.loss(batch(step=step))["loss"].backward()
        assert all(p.grad is None for p in teacher)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.on_step_end(step, max_steps)
        mom = 1 - (1 - 0.9) * (math.cos(math.pi * step / max_steps) + 1) / 2  # 0.9, then 0.9146…
        for t, t0, s in zip(teacher, t_old, student):
            assert torch.allclose(t, mom * t0 + (1 - mom) * s.detach(), atol=1e-6)
    assert not torch.allclose(m.teacher_head.mlp[0].weight, m.head.mlp[0].weight)


def test_teacher_sees_only_the_two_global_crops():
    m = make(n_local=4)
    shapes = {"student": [], "teacher": []}
    m.backbone.register_forward_hook(lambda mod, inp, out: shapes["student"].append(tuple(inp[0].shape)))
    m.teacher_backbone.register_forward_hook(lambda mod, inp, out: shapes["teacher"].append(tuple(inp[0].shape)))
    m.loss(batch(n=6))
    assert shapes["teacher"] == [(12, 3, 16, 16)]  # one forward, 2 global crops x 6 images
    assert shapes["student"] == [(12, 3, 16, 16), (24, 3, 8, 8)]  # one forward per resolution


def test_weight_norm_magnitude_stays_one():
    m = make(n_local=1)
    g = m.head.last_layer.weight_g
    assert not g.requires_grad and all(p is not g for p in m.optim_groups()["loss"])
    v0 = m.head.last_layer.weight_v.detach().norm(dim=1).clone()
    opt = torch.optim.AdamW(m.optim_groups()["loss"], lr=0.05, weight_decay=0.04)
    for step in range(3):
        m.loss(batch(step=step))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.on_step_end(step, 3)
    assert not torch.allclose(m.head.last_layer.weight_v.norm(dim=1), v0)  # v itself moved
    for head in (m.head, m.teacher_head):
        assert torch.allclose(head.last_weight().norm(dim=1), torch.ones(64), atol=1e-6)
        assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))


def test_exported_backbone_is_the_teacher():
    m = make(n_local=1, momentum_teacher=0.5)
    assert m.exported_backbone() is m.teacher_backbone and m.exported_backbone() is not m.backbone
    opt = torch.optim.SGD(m.optim_groups()["loss"], lr=0.5)
    m.loss(batch())["loss"].backward()
    opt.step()
    m.on_step_end(0, 10)
    exported, student = m.exported_backbone().model.conv1.weight, m.backbone.model.conv1.weight
    assert not torch.allclose(exported, student)
    assert torch.equal(exported, m.teacher_backbone.model.conv1.weight)


@pytest.mark.parametrize("field,value", [
    ("n_local_views", -1), ("student_temp", 0.0), ("teacher_temp", -0.04), ("warmup_teacher_temp", 0.0),
    ("momentum_teacher", 1.5), ("momentum_teacher", -0.1), ("center_momentum", 2.0), ("out_dim", 0),
    ("warmup_teacher_temp_epochs", -1.0), ("freeze_last_layer_epochs", -1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"method_args.{field}="):
        make(**{field: value})


def test_loss_rejects_crop_counts_that_do_not_split():
    with pytest.raises(ValueError, match="n_crops"):
        dino_loss(torch.randn(10, 4), torch.rand(4, 4), 3)


def test_global_batchnorm_keeps_the_teacher_frozen():
    m = make(n_local=1)
    m.convert_batchnorm()  # what the trainer does with several processes
    teacher = {id(p) for p in [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()]}
    assert all(not p.requires_grad for p in [*m.teacher_backbone.parameters(), *m.teacher_head.parameters()])
    assert not any(id(p) in teacher for p in m.optim_groups()["loss"])
