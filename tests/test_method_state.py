"""Registry-driven: a method's whole training state (EMA targets, queues, centres, pointers) is in its
``state_dict``, so stopping after a step, checkpointing through ``sslhub.train.checkpoint`` and resuming in a
fresh object gives exactly the steps of an uninterrupted run.  No per-method code."""
import math

import pytest
import torch
from test_methods_smoke import recipe_for

from sslhub.methods.base import Batch
from sslhub.methods.registry import list_methods
from sslhub.train.checkpoint import load_state, save_state

STEPS = 3


def make(name):
    r = recipe_for(name)
    torch.manual_seed(0)
    m = list_methods()[name].create(r.encoder, r.method_args)
    m.configure(steps_per_epoch=2, max_steps=STEPS)  # epoch-based schedules change within the run
    params = [p for p in m.parameters() if p.requires_grad]
    return m, torch.optim.SGD(params, lr=0.05, momentum=0.9), params


def steps(method, opt, images, texts, start, stop):
    losses = []
    for s in range(start, stop):
        out = method.loss(Batch(images, texts=texts, rng=torch.Generator().manual_seed(s), step=s))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_step_end(s, STEPS)
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("name", list(list_methods()))
def test_checkpoint_and_resume_equals_uninterrupted(tmp_path, name):
    cls = list_methods()[name]
    size = recipe_for(name).encoder.image_size
    images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    texts = [f"a photo number {i}" for i in range(8)] if cls.needs_text else None

    ref, ref_opt, _ = make(name)
    ref_losses = steps(ref, ref_opt, images, texts, 0, STEPS)
    assert all(math.isfinite(x) for x in ref_losses)

    first, first_opt, _ = make(name)
    losses = steps(first, first_opt, images, texts, 0, 1)
    save_state(tmp_path / "ckpt.safetensors", {"model": first.state_dict(), "optim": first_opt.state_dict()})
    del first, first_opt

    resumed, opt, _ = make(name)
    state = load_state(tmp_path / "ckpt.safetensors")
    resumed.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    losses += steps(resumed, opt, images, texts, 1, STEPS)

    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), f"{name}: {k} differs after resume"
