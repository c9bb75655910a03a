"""Registry-driven: every registered method trains a step from its own recipe, with no per-method code."""
import math

import pytest
import torch
from conftest import REPO, tiny

from sslhub.methods.base import Batch
from sslhub.methods.registry import list_methods
from sslhub.train.recipe import load_recipe


def recipe_for(name):
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        r = load_recipe(path)
        if r.method == name:
            return load_recipe(path, tiny(r))
    pytest.fail(f"no recipe in recipes/ for method {name!r}")


@pytest.mark.parametrize("name", list(list_methods()))
def test_method_step_is_finite_and_trains_the_backbone(name):
    r = recipe_for(name)
    torch.manual_seed(0)
    cls = list_methods()[name]
    method = cls.create(r.encoder, r.method_args)
    images = torch.randint(0, 256, (8, 3, r.encoder.image_size, r.encoder.image_size), dtype=torch.uint8)
    texts = [f"a photo number {i}" for i in range(8)] if cls.needs_text else None
    out = method.loss(Batch(images, torch.zeros(8, dtype=torch.long), texts=texts,
                            rng=torch.Generator().manual_seed(0)))
    assert "loss" in out and out["loss"].dim() == 0 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    grads = [p.grad for p in method.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    method.on_step_end(0, 10)
    for k in method.optim_groups():
        assert k in out, f"optim group {k!r} has no loss of that name"
