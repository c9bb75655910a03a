"""The non-finite guard and the checkpoints it relies on: never a NaN saved, advice that works when followed,
checksums verified on resume, the last K kept, Ctrl-C saves and says how to resume."""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from sslhub.apps.cli import main
from sslhub.methods.rotation import Rotation
from sslhub.train.checkpoint import CheckpointError, list_checkpoints, load_state, read_info, save_state

RECIPE = str(REPO / "recipes/rotation_cifar10.yaml")
# a 4-stage ResNet of 8 channels: each step takes a few milliseconds
BASE = ["--set", "encoder.model_args.channels=[8,8,8,8]", "--set", "data.batch_size=32", "--set",
        "data.num_workers=0", "--set", "train.log_every=1", "--set", "eval.knn.test=", "--set", "eval.pretext=false",
        "--set", "optim.warmup_epochs=0", "--no-progress"]


def train(out, *extra) -> int:
    return main(["train", RECIPE, *BASE, "--out", str(out), *extra])


def steps(run) -> list[int]:
    return [read_info(p)["step"] for p in list_checkpoints(run / "checkpoints")]


def all_finite(path) -> bool:
    flat = load_state(path)
    tensors = [flat["model"][k] for k in flat["model"]]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------------- checksums, keep K
def test_a_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_state(path, {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "step": 3})
    data = bytearray(path.read_bytes())
    data[-1024:] = bytes(1024)  # the tail zeroed: still a valid safetensors file of valid floats
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_state(path)


def test_resume_keeps_the_last_k_and_passes_over_a_damaged_one(tmp_path, caplog):
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=4", "--set", "train.ckpt_every=1",
                 "--set", "train.keep_checkpoints=2") == 0
    assert steps(run) == [4, 3]
    newest = list_checkpoints(run / "checkpoints")[0]
    data = bytearray(newest.read_bytes())
    data[-512:] = bytes(512)
    newest.write_bytes(bytes(data))
    caplog.clear()
    assert train(run, "--resume", "--set", "train.max_steps=5", "--set", "train.ckpt_every=1",
                 "--set", "train.keep_checkpoints=2") == 0
    err = caplog.text
    assert "resumed from" in err and "step-0000003.safetensors at step 3/5" in err
    assert "step-0000004.safetensors: damaged" in err
    assert (run / "checkpoints" / "rejected" / "step-0000004.safetensors").is_file()  # kept, out of the way
    assert steps(run) == [5, 4]


# ---------------------------------------------------------------------- the guard
def test_the_guards_advice_works_when_followed(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    # lr 1000 (5000× the recipe's): the weights grow ~10× a step until a tensor overflows
    assert train(run, "--set", "optim.lr=1000", "--set", "train.max_steps=14", "--set", "train.ckpt_every=1",
                 "--set", "train.keep_checkpoints=20") == 2
    err = capsys.readouterr().err
    assert "training stopped" in err and "Traceback" not in err
    assert all(all_finite(p) for p in list_checkpoints(run / "checkpoints")), "a checkpoint holds a NaN"
    named = re.search(r"the newest healthy checkpoint is (\S+) \(step (\d+)", err)
    assert named, err
    # it is finite and not diverging: its weight norm is within 100× its start; the later ones are far beyond
    info = read_info(named.group(1))
    assert info["weight_norm"] < 100 * info["weight_norm_start"]
    assert any(read_info(p)["weight_norm"] > 1e4 * info["weight_norm_start"] for p in list_checkpoints(run /
               "checkpoints"))
    assert "fp32" not in err, "an fp32 run is not told to use fp32"
    cmd = re.search(r"(sslhub train \S+ --out \S+ --resume --set optim\.lr=100)\s*$", err.strip())
    assert cmd, err
    caplog.clear()
    assert main([*shlex.split(cmd.group(1))[1:], "--no-progress"]) == 0, "following the advice trains to the end"
    err = caplog.text
    assert f"at step {named.group(2)}/14" in err and "passed over" in err
    assert (run / "export" / "model.safetensors").is_file() and steps(run)[0] == 14
    assert all(all_finite(p) for p in list_checkpoints(run / "checkpoints"))


def test_nan_gradients_from_a_finite_loss_stop_before_the_update(tmp_path, capsys, monkeypatch):
    real = Rotation.loss

    def loss_with_nan_gradient(self, batch):
        out = real(self, batch)
        if batch.step == 2:  # finite in the forward (0 · sqrt(0) = 0), NaN in the backward (0 · ∞)
            zero = sum(p.sum() for p in self.parameters()) * 0
            out["loss"] = out["loss"] + 0 * torch.sqrt(zero)
        return out

    monkeypatch.setattr(Rotation, "loss", loss_with_nan_gradient)
    run = tmp_path / "run"
    assert train(run, "--set", "train.max_steps=5", "--set", "train.ckpt_every=1") == 2
    err = capsys.readouterr().err
    assert "the gradients are not finite at step 2" in err
    assert "step-0000002.safetensors (step 2, finite and not diverging)" in err
    assert steps(run) == [2, 1] and all(all_finite(p) for p in list_checkpoints(run / "checkpoints"))
    assert math.isfinite(read_info(list_checkpoints(run / "checkpoints")[0])["loss"])


# ---------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "sslhub", "train", RECIPE, *BASE, "--set", "train.max_steps=5000",
            "--set", "train.ckpt_every=10000", "--out", str(run)]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # start-up and 3 steps on a loaded 2-core machine
    while time.time() < deadline and not ((run / "metrics.csv").is_file() and
                                          len((run / "metrics.csv").read_text().splitlines()) > 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    stopped = re.search(r"interrupted at step (\d+)/5000: the run is saved in (\S+); continue it with: "
                        r"(sslhub train .* --resume)$", err.strip())
    assert stopped and "Traceback" not in err, err
    done = int(stopped.group(1))
    assert done >= 3 and steps(run) == [done]  # saved by the interrupt (train.ckpt_every is 10000)
    res = subprocess.run([sys.executable, "-m", "sslhub", *shlex.split(stopped.group(3))[1:],
                          "--set", f"train.max_steps={done + 1}", "--no-progress"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"at step {done}/{done + 1}" in res.stderr, res.stderr
