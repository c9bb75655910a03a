"""The second-optimiser path with a real discriminator: each loss moves only its own parameters, through the
trainer's own step functions; the GAN losses against the written-out log-likelihoods; ``optim_groups`` checked."""
import copy
import math

import pytest
import torch
from torch import nn

from sslhub.methods.adversarial import ConvDiscriminator, discriminator_loss, generator_loss
from sslhub.methods.base import Batch, Method, MethodConfig
from sslhub.train.step import accumulate_gradients, apply_update, check_groups

LAMBDA_ADV = 0.5


class ToyInpainter(Method):
    """A generator that fills images, a reconstruction loss and an adversarial term: the context encoder's shape."""

    def __init__(self):
        super().__init__(nn.Identity(), MethodConfig())
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
        self.discriminator = ConvDiscriminator(3, width=8, depth=2)

    def losses(self, images: torch.Tensor):
        x = images.float() / 255
        fake = self.generator(x)
        rec = (fake - x).pow(2).mean()
        g = rec + LAMBDA_ADV * generator_loss(self.discriminator(fake))
        d = discriminator_loss(self.discriminator(x), self.discriminator(fake.detach()))
        return g, d

    def loss(self, batch: Batch):
        g, d = self.losses(batch.images)
        return {"loss": g, "d_loss": d}

    def optim_groups(self):
        return {"loss": list(self.generator.parameters()), "d_loss": list(self.discriminator.parameters())}


def test_each_loss_moves_only_its_own_parameters():
    """One trainer step with plain SGD: the generator moves by −lr·∂(its loss)/∂θ_G — the adversarial term through
    the discriminator included — and the discriminator by −lr·∂(its loss)/∂θ_D, nothing else."""
    m = ToyInpainter()
    ref = copy.deepcopy(m)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    groups = m.optim_groups()
    check_groups(m, groups)
    lr = 0.1
    opts = {k: torch.optim.SGD(ps, lr=lr) for k, ps in groups.items()}
    accumulate_gradients(m, groups, [Batch(images, rng=torch.Generator().manual_seed(0))])
    apply_update(m, opts, [p for ps in groups.values() for p in ps], step=0, max_steps=1)
    g, d = ref.losses(images)  # the same forward (BN in train mode on the same batches)
    g_params, d_params = list(ref.generator.parameters()), list(ref.discriminator.parameters())
    want_g = torch.autograd.grad(g, g_params, retain_graph=True)
    want_d = torch.autograd.grad(d, d_params)
    leak = torch.autograd.grad(ref.losses(images)[0], d_params)  # what the generator's loss would do to D
    assert max(float(x.abs().max()) for x in leak) > 1e-4  # the adversarial term does reach D's weights …
    for p, p0, gr in zip(m.generator.parameters(), g_params, want_g):
        assert torch.allclose(p, p0 - lr * gr, atol=1e-6)
    for p, p0, gr in zip(m.discriminator.parameters(), d_params, want_d):
        assert torch.allclose(p, p0 - lr * gr, atol=1e-6)  # … but only D's own loss moves them


def test_gan_losses_are_the_log_likelihoods():
    r, f = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want_d = -sum(math.log(sig(v)) for v in r.tolist()) / 2 - sum(math.log(1 - sig(v)) for v in f.tolist()) / 2
    want_g = -sum(math.log(sig(v)) for v in f.tolist()) / 2
    assert discriminator_loss(r, f).item() == pytest.approx(want_d, rel=1e-6)
    assert generator_loss(f).item() == pytest.approx(want_g, rel=1e-6)


def test_discriminator_shapes():
    x = torch.randn(3, 3, 16, 16)
    assert ConvDiscriminator(width=8, depth=3)(x).shape == (3,)
    assert ConvDiscriminator(width=8, depth=3, patch=True)(x).shape == (3, 1, 2, 2)


def test_optim_groups_must_cover_every_trainable_parameter_once():
    m = ToyInpainter()
    gen, dis = list(m.generator.parameters()), list(m.discriminator.parameters())
    with pytest.raises(ValueError, match="stepped twice"):
        check_groups(m, {"loss": gen + dis[:1], "d_loss": dis})
    with pytest.raises(ValueError, match="never train"):
        check_groups(m, {"loss": gen, "d_loss": dis[1:]})
    with pytest.raises(ValueError, match="no parameters"):
        check_groups(m, {"loss": gen + dis, "d_loss": []})
