"""A run folder is never silently replaced: an existing run needs --resume or --overwrite, and nothing is
written into --out before the recipe and the data have been read."""
from __future__ import annotations

import json

from conftest import REPO, TINY

from sslhub.apps.cli import main

RECIPE = str(REPO / "recipes/rotation_cifar10.yaml")
BASE = [*sum((["--set", s] for s in TINY), []), "--set", "eval.knn.test=", "--no-progress"]


def train(out, *extra) -> int:
    return main(["train", RECIPE, *BASE, "--out", str(out), *extra])


def snapshot(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and "tensorboard" not in p.parts}


def test_an_existing_run_is_kept_unless_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=1") == 0
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--set", "train.max_steps=2") == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before  # not a byte changed

    assert train(run, "--set", "train.max_steps=2", "--overwrite") == 0
    cfg = json.loads((run / "export" / "config.json").read_text())
    assert cfg["sslhub"]["steps"] == 2 and json.loads((run / "recipe.json").read_text())["train"]["max_steps"] == 2


def test_overwrite_removes_the_old_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=2") == 0
    old = (run / "checkpoints" / "step-0000002.safetensors").read_bytes()
    # the replacing run fails before its first checkpoint: the old one must not be left to --resume
    assert train(run, "--set", "train.max_steps=3", "--set", "optim.lr=1e30", "--set", "optim.warmup_epochs=0",
                 "--set", "train.ckpt_every=100", "--overwrite") == 2  # diverges at step 1
    assert not (run / "checkpoints" / "step-0000002.safetensors").exists() and old


def test_bad_data_leaves_the_run_folder_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=1") == 0
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--resume", "--set", f"data.train={tmp_path / 'missing'}") == 2
    assert "missing" in capsys.readouterr().err
    assert snapshot(run) == before  # recipe.json included


def test_an_empty_folder_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert train(tmp_path / "empty", "--set", "train.max_steps=1") == 0


def test_resume_with_another_recipe_names_the_changed_keys(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=2") == 0
    capsys.readouterr()
    assert train(run, "--resume", "--set", "train.max_steps=2", "--set", "optim.weight_decay=0.5",
                 "--set", "encoder.model_args.channels=[8,16,32,64]") == 2
    err = capsys.readouterr().err
    assert "was written by a run with another recipe" in err and "optim.weight_decay: " in err and "→ 0.5" in err
    assert "encoder.model_args.channels" in err and "Traceback" not in err
    # its length, logging and evaluation may change: training continues from step 2 to 3
    assert train(run, "--resume", "--set", "train.max_steps=3", "--set", "train.log_every=2") == 0
    assert json.loads((run / "export" / "config.json").read_text())["sslhub"]["steps"] == 3
