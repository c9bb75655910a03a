"""Every method's ``Config`` and the recipe's own blocks check their values when the recipe loads.

Registry-driven: each registered method, each numeric field of its ``Config`` (nested views included)
gets a clearly invalid value through ``load_recipe(..., overrides=[...])`` on the method's own recipe,
and the error must be a ``ConfigError`` naming the file and ``method_args.<key>``.  Through the CLI the
error comes before any data is read.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import typing
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from conftest import REPO

from sslhub.config import ConfigError, InvalidValue, check, from_dict
from sslhub.data.augment import ViewConfig
from sslhub.errors import SslhubError
from sslhub.methods import list_methods
from sslhub.methods.simclr import SimCLRConfig
from sslhub.train.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
METHODS = list_methods()

# Numeric fields for which no value of the right type is invalid, with the reason.
NO_INVALID_VALUE = {
    (ViewConfig, "mean"): "any per-channel mean is a valid normalisation (and methods use the encoder's)",
}
# Fields that hold a probability or a momentum: 1.5 must be rejected as well as -1.
UNIT_INTERVAL = {"momentum", "tau_base", "momentum_teacher", "center_momentum"}


def recipe_for(method: str):
    """The first recipe in recipes/ whose ``method:`` is ``method``."""
    for path in RECIPES:
        if yaml.safe_load(path.read_text()).get("method") == method:
            return path
    raise AssertionError(f"no recipe in recipes/ for method {method!r}")


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def bad_values(cls: type, prefix: str = ""):
    """``(dotted key, invalid value)`` for every numeric field of dataclass ``cls`` (nested ones included)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = _strip_optional(hints[f.name]), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from bad_values(tp, f"{key}.")
            continue
        if (cls, f.name) in NO_INVALID_VALUE:
            continue
        if tp in (int, float):  # bool is neither
            yield key, -1 if tp is int else -1.0
            if f.name.endswith("_p") or f.name in UNIT_INTERVAL:
                yield key, 1.5
        elif get_origin(tp) is tuple and get_args(tp) and all(a in (int, float, Ellipsis) for a in get_args(tp)):
            args = get_args(tp)
            n = 1 if args[-1] is Ellipsis else len(args)
            yield key, [-1] * n


def numeric_fields(cls: type, prefix: str = "") -> set[str]:
    """Every int / float / numeric-tuple field of ``cls``, exempt or not (to check the test covers them)."""
    hints, out = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        tp, key = _strip_optional(hints[f.name]), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out |= numeric_fields(tp, f"{key}.")
        elif tp in (int, float) or (get_origin(tp) is tuple and all(a in (int, float, Ellipsis) for a in get_args(tp))):
            out.add(key)
    return out


CASES = [(name, key, bad) for name, cls in METHODS.items() for key, bad in bad_values(cls.Config)]


# ----------------------------------------------------------------------------- (a) defaults are valid
@pytest.mark.parametrize("name", list(METHODS))
def test_default_config_is_valid(name):
    cls = METHODS[name].Config
    cfg = cls()
    assert from_dict(cls, {}, "defaults", prefix="method_args.") == cfg
    assert load_recipe(recipe_for(name)).method == name


# ----------------------------------------------------------------------------- (b) every numeric field
@pytest.mark.parametrize("name, key, bad", CASES, ids=[f"{n}-{k}={b}" for n, k, b in CASES])
def test_invalid_value_is_refused_when_the_recipe_loads(name, key, bad):
    path = recipe_for(name)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, overrides=[f"method_args.{key}={json.dumps(bad)}"])
    msg = str(e.value)
    assert msg.startswith(f"--set method_args.{key}=") and f": method_args.{key}=" in msg, msg  # the --set is blamed


@pytest.mark.parametrize("name", list(METHODS))
def test_every_numeric_field_is_covered(name):
    cfg_cls = METHODS[name].Config
    covered = {k for n, k, _ in CASES if n == name}
    exempt = {k for k in numeric_fields(cfg_cls) if k.rsplit(".", 1)[-1] in {f for _, f in NO_INVALID_VALUE}}
    assert numeric_fields(cfg_cls) == covered | exempt
    assert covered, f"{name}: no numeric field found"


@pytest.mark.parametrize("override, key", [
    ("method_args.views.scale=[0.9, 0.1]", "views.scale"),  # lo > hi
    ("method_args.views.scale=[0.5, 1.5]", "views.scale"),  # more than the whole image
    ("method_args.views.ratio=[2.0, 0.5]", "views.ratio"),
    ("method_args.views.hue=0.6", "views.hue"),
    ("method_args.views.blur_kernel_frac=1.5", "views.blur_kernel_frac"),
    ("method_args.views.blur_sigma=[0.0, 2.0]", "views.blur_sigma"),
    ("method_args.views.size=0", "views.size"),
    ("method_args.proj_dim=0", "proj_dim"),
    ("method_args.temperature=.nan", "temperature"),
])
def test_more_invalid_values(override, key):
    path = REPO / "recipes/simclr_cifar10.yaml"
    with pytest.raises(ConfigError, match=rf"^--set method_args\.{key}=.*: method_args\.{key}="):
        load_recipe(path, [override])


def test_cross_field_check_names_the_field():
    """SwAV's crops_for_assign depends on n_local_views: the message names the crop range."""
    with pytest.raises(ConfigError,
                       match=r"method_args\.crops_for_assign=\(0, 3\): must be distinct crop indices in 0\.\.2"):
        load_recipe(recipe_for("swav"), ["method_args.n_local_views=1", "method_args.crops_for_assign=[0, 3]"])


@pytest.mark.parametrize("override", [
    "data.batch_size=0", "data.num_workers=-1", "optim.lr=0", "optim.lr=-0.1", "optim.weight_decay=-1.0e-6",
    "optim.warmup_epochs=-1", "optim.momentum=1.5", "optim.betas=[0.9, 1.0]", "optim.min_lr_ratio=-0.1",
    "optim.clip_grad=0", "optim.trust_coefficient=0", "train.accumulate=0", "train.log_every=0",
    "train.ckpt_every=0", "train.epochs=0", "train.max_steps=0", "train.threads=0", "eval.knn.k=[0]",
    "eval.knn.temperature=0", "eval.retrieval.k=[0, 5]", "encoder.image_size=0",
])
def test_recipe_blocks_are_checked(override):
    key = override.split("=")[0]
    k = key.replace('.', chr(92) + '.')
    with pytest.raises(ConfigError, match=rf"^--set {k}=.*: {k}="):
        load_recipe(REPO / "recipes/simclr_cifar10.yaml", [override])


def test_valid_edge_values_are_accepted():
    r = load_recipe(REPO / "recipes/simclr_cifar10.yaml", [
        "optim.weight_decay=0", "optim.warmup_epochs=0", "data.num_workers=0", "train.max_steps=1",
        "method_args.views.jitter_p=1.0", "method_args.views.scale=[1.0, 1.0]", "method_args.views.blur_p=0"])
    assert r.train.max_steps == 1
    load_recipe(recipe_for("rotation"), ["method_args.head_hidden_dim=0"])  # 0 = a linear classifier
    load_recipe(recipe_for("dino"), ["method_args.n_local_views=0", "method_args.momentum_teacher=1.0"])


# ----------------------------------------------------------------------------- the helper and the error classes
@dataclasses.dataclass
class Inner:
    p: float = 0.5

    def __post_init__(self):
        check(0 <= self.p <= 1, "p", "a probability must be in [0, 1]")


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_config_built_in_python_raises_invalid_value_naming_the_key():
    with pytest.raises(InvalidValue, match=r"^temperature: must be > 0") as e:
        SimCLRConfig(temperature=0.0)
    assert isinstance(e.value, ValueError) and e.value.key == "temperature"
    with pytest.raises(ValueError, match=r"^scale: "):
        ViewConfig(scale=(0.5, 0.2))


def test_check_helper_and_config_error_classes():
    check(True, "x", "never raised")
    with pytest.raises(InvalidValue) as e:
        check(False, "x", "must be positive")
    assert (e.value.key, e.value.message, str(e.value)) == ("x", "must be positive", "x: must be positive")
    assert issubclass(ConfigError, SslhubError) and issubclass(ConfigError, ValueError)
    assert issubclass(InvalidValue, SslhubError) and issubclass(InvalidValue, ValueError)
    with pytest.raises(ConfigError, match=r"^x\.yaml: block\.inner\.p=2\.0: a probability must be in \[0, 1\]$"):
        from_dict(Outer, {"inner": {"p": 2.0}}, "x.yaml", prefix="block.")


# ----------------------------------------------------------------------------- (c) before any data is read
def _train(tmp_path, recipe, *sets):
    missing = tmp_path / "no-such-data"
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sslhub", "train", str(recipe), "--no-progress", "--out", str(out),
            "--set", f"data.train={missing}", *[a for s in sets for a in ("--set", s)]]
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    return p, missing, out


def test_cli_refuses_a_bad_value_before_reading_any_data(tmp_path):
    """One subprocess (the CLI imports take ~20 s here); the other keys go through the same load_recipe."""
    p, missing, out = _train(tmp_path, recipe_for("simclr"), "method_args.temperature=0")
    assert p.returncode == 2, p.stderr
    assert "method_args.temperature=0.0: must be > 0" in p.stderr and str(missing) not in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert not out.exists()  # not even the run folder was made


def test_cli_control_a_valid_recipe_does_reach_the_data(tmp_path):
    """Without the bad value the same command fails on the missing data: so the test above is meaningful."""
    p, missing, _ = _train(tmp_path, recipe_for("simclr"))
    assert p.returncode == 2, p.stderr
    assert str(missing) in p.stderr and "method_args" not in p.stderr, p.stderr
