import dataclasses
import re
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
def test_bad_keys_and_types_name_the_key_and_the_set(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(REPO / "recipes/simclr_cifar10.yaml", [override])
    assert message in str(e.value)
    assert str(e.value).startswith(f"--set {override}: ")  # the value came from --set, not from the file


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


def test_every_float_form_is_a_float(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; wherever a float is expected, any form float() takes is accepted."""
    recipe = REPO / "recipes/simclr_cifar10.yaml"
    r = load_recipe(recipe, ["optim.lr=1e-3", "optim.weight_decay=3e-4", "optim.min_lr_ratio=1E-2",
                             "method_args.temperature=2.5e-1"])
    assert (r.optim.lr, r.optim.weight_decay, r.optim.min_lr_ratio, r.method_args.temperature) == (1e-3, 3e-4, 1e-2, 0.25)
    f = tmp_path / "r.yaml"
    f.write_text(recipe.read_text().replace("  lr: 1.0 ", "  lr: 1e30 ", 1))
    assert load_recipe(f).optim.lr == 1e30
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_recipe(recipe, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        load_recipe(recipe, ["train.max_steps=1e3"])  # an int is not a float


def test_errors_name_the_set_or_the_file(tmp_path):
    recipe = REPO / "recipes/simclr_cifar10.yaml"
    with pytest.raises(ConfigError, match=r"^--set optim\.lr=-1: optim\.lr=-1\.0: ") as e:
        load_recipe(recipe, ["optim.lr=-1"])
    assert str(recipe) not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--set optim\.lrr=1: unknown key optim\.'lrr' \(did you mean"):
        load_recipe(recipe, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set method_args\.views=\{scale: \[0\.9, 0\.1\]\}: method_args\.views\.scale="):
        load_recipe(recipe, ["method_args.views={scale: [0.9, 0.1]}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("temperature: ", "temperature: -", 1))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: method_args\.temperature=-"):
        load_recipe(bad, ["optim.lr=0.1"])  # an override of another key does not take the blame


def test_encoder_model_args_may_not_name_a_weight_source():
    """timm.create_model(arch, checkpoint_path=…) would torch.load (unpickle) that file: refused in a recipe."""
    import pytest

    from sslhub.config import ConfigError
    from sslhub.train.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=r"encoder.model_args.*checkpoint_path"):
        recipe_from_dict({"method": "simclr", "encoder": {"model_args": {"checkpoint_path": "/tmp/evil.pth"}}})
