import dataclasses
from pathlib import Path

import pytest
from conftest import REPO

from sslhub.config import ConfigError
from sslhub.data.augment import ViewConfig
from sslhub.methods.registry import get_method, list_methods
from sslhub.train.recipe import load_recipe, recipe_from_dict

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_names_a_registered_method(path):
    r = load_recipe(path)
    assert r.method in list_methods()
    assert isinstance(r.method_args, get_method(r.method).Config)


def test_every_method_has_a_recipe():
    named = {load_recipe(p).method for p in RECIPES}
    assert set(list_methods()) <= named


def test_overrides_are_typed():
    r = load_recipe(REPO / "recipes/simclr_cifar10.yaml",
                    ["optim.lr=0.1", "encoder.cifar_stem=false", "method_args.views.scale=[0.2, 1.0]",
                     "train.max_steps=5", "encoder.model_args.channels=[8,16,32,64]"])
    assert r.optim.lr == 0.1 and r.encoder.cifar_stem is False and r.train.max_steps == 5
    assert tuple(r.method_args.views.scale) == (0.2, 1.0)
    assert r.encoder.model_args["channels"] == [8, 16, 32, 64]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown key optim.'lrr' (did you mean optim.'lr'?)"),
    ("method_args.temprature=0.1", "unknown key method_args.'temprature'"),
    ("bogus=1", "unknown key 'bogus'"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast' (str)"),
    ("train.max_steps=1.5", "train.max_steps: expected"),
    ("optim.name=adam", "optim.name: expected 'lars' | 'sgd' | 'adamw'"),
    ("encoder.cifar_stem=3", "encoder.cifar_stem: expected bool"),
    ("method_args.views.scale=[0.1]", "method_args.views.scale"),
])
def test_bad_keys_and_types_name_the_key_and_file(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(REPO / "recipes/simclr_cifar10.yaml", [override])
    assert message in str(e.value)
    assert "simclr_cifar10.yaml" in str(e.value)


def test_unknown_method_and_missing_file():
    with pytest.raises(ConfigError, match="unknown method 'simclear'. Did you mean 'simclr'"):
        recipe_from_dict({"method": "simclear"})
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(Path("no/such/recipe.yaml"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        recipe_from_dict({"method": "simclr"}, overrides=["optim.lr"])


def test_a_partial_nested_block_keeps_the_fields_own_defaults():
    """``views: {size: 64}`` changes the size only: the method's own view defaults (not ViewConfig's) stay."""
    default = get_method("rotation").Config().views
    assert default.jitter_p == 0.0 and ViewConfig().jitter_p != 0.0  # the method's default differs from the class's
    r = recipe_from_dict({"method": "rotation", "method_args": {"views": {"size": 64}}})
    assert r.method_args.views.size == 64
    assert dataclasses.replace(r.method_args.views, size=default.size) == default
