"""``sslhub --help`` answers at once: parsing the command line, and ``import sslhub``, import no torch
(what took ~7 s); a command imports what it needs when it runs. Checked on the modules loaded in a fresh
interpreter, never on timings."""
import json
import subprocess
import sys

import pytest
from conftest import REPO

HEAVY = ("torch", "torchvision", "timm", "numpy", "transformers", "open_clip", "sklearn", "faiss", "PIL")


def run_fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


CLI = """
import contextlib, io, json, sys
from sslhub.apps.cli import main

out = {}
for argv in ARGVS:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    out[" ".join(argv)] = {"code": code, "stderr": err.getvalue()}
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"runs": out, "heavy": heavy}))
"""


def test_help_and_usage_errors_import_nothing_heavy():
    argvs = [["--help"], ["--version"], ["train", "--help"], ["eval", "linear", "--help"], ["index", "search", "-h"],
             ["train"], ["eval", "knn", "--model", "m"], ["no-such-command"]]
    res = run_fresh(f"ARGVS = {argvs!r}\nHEAVY = {HEAVY!r}\n" + CLI)
    assert res["heavy"] == [], f"parsing the command line imported {res['heavy']}"
    runs = res["runs"]
    for argv in ("--help", "--version", "train --help", "eval linear --help", "index search -h"):
        assert runs[argv]["code"] == 0, runs[argv]
    for argv in ("train", "eval knn --model m", "no-such-command"):
        assert runs[argv]["code"] == 2 and runs[argv]["stderr"].strip().splitlines()[-1].startswith("sslhub"), runs[argv]


def test_import_sslhub_is_light_and_its_api_loads_on_use():
    """``import sslhub`` keeps its promise to plain timm (``resnet18_cifar`` … for CIFAR-stem exports) without
    importing torch: the architectures are registered once timm is imported (a mere lookup changes nothing)."""
    res = run_fresh(f"import importlib.util, json, sys, sslhub\nHEAVY = {HEAVY!r}\n"
                    "light = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))\n"
                    "importlib.util.find_spec('timm')\n"
                    "import timm\n"
                    "archs = [timm.is_model(a) for a in ('resnet18_cifar', 'resnet50_cifar')]\n"
                    "from sslhub import load_encoder, Encoder, LoadError\n"
                    "print(json.dumps({'light': light, 'archs': archs,\n"
                    "                  'api': [load_encoder.__module__, Encoder.__module__, LoadError.__module__]}))")
    assert res["light"] == [], f"import sslhub imported {res['light']}"
    assert res["archs"] == [True, True]
    assert res["api"] == ["sslhub.inference.load", "sslhub.inference.loaders.base", "sslhub.inference.loaders.base"]


def test_cifar_stem_archs_registered_when_timm_came_first():
    res = run_fresh("import json, timm, sslhub\n"
                    "print(json.dumps([timm.is_model(a) for a in ('resnet18_cifar', 'resnet50_cifar')]))")
    assert res == [True, True]


def test_a_recipe_error_imports_nothing_heavy(tmp_path):
    """Errors in a recipe's top level (the method's own ``method_args`` need the method, and torch) and in the
    file itself are reported before torch is imported."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: simclr\ndata: [unclosed\n")
    argvs = [["train", "recipes/simclr_cifar10.yaml", "--set", "data.batch_size=0"],
             ["train", "recipes/simclr_cifar10.yaml", "--set", "train.max_steps=-5"],
             ["train", "recipes/simclr_cifar10.yaml", "--set", "optim.lr=fast"],
             ["train", "recipes/simclr_cifar10.yaml", "--set", "encoder.image_size=0"],
             ["train", "recipes/missing.yaml"], ["train", str(bad_yaml)]]
    res = run_fresh(f"ARGVS = {argvs!r}\nHEAVY = {HEAVY!r}\n" + CLI)
    for argv in argvs:
        run = res["runs"][" ".join(argv)]
        assert run["code"] == 2 and run["stderr"].startswith("sslhub: error: ") and "Traceback" not in run["stderr"], run
    assert res["heavy"] == []
