"""2 processes (torchrun, gloo on CPU) give the losses, gradients and final state of 1 process at the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from dist_worker import STEPS, VARIANTS, assert_grads_close, build, run
from safetensors.torch import load_file

from sslhub.methods.registry import list_methods

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}


@pytest.mark.parametrize("name", [*list_methods(), *VARIANTS])
def test_two_processes_equal_one(tmp_path, name):
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    subprocess.run([*TORCHRUN, str(REPO / "tests/dist_worker.py"), name, str(tmp_path)], check=True, env=ENV,
                   cwd=tmp_path, timeout=300)
    one = run(build(name, tmp_path), images)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert set(got) == set(one)
        for s in range(STEPS):
            assert got[f"loss{s}"].item() == pytest.approx(one[f"loss{s}"].item(), rel=1e-5, abs=1e-6), f"loss of step {s}"
            prefix = f"grad{s}."
            assert_grads_close({k: v for k, v in got.items() if k.startswith(prefix)},
                               {k: v for k, v in one.items() if k.startswith(prefix)}, s)
        for k in (k for k in one if k.startswith("state.")):  # parameters, EMA targets, queues, centres
            assert torch.allclose(got[k], one[k], rtol=1e-4, atol=1e-5), \
                f"{k}: max diff {(got[k] - one[k]).abs().max():.3g}"


def test_torchrun_training_equals_one_process(tmp_path):
    """The whole trainer: 2 processes x 8 images = 1 process x 16 images, step for step."""
    args = [str(REPO / "recipes/simclr_cifar10.yaml"),
            "--set", "encoder.model_args.channels=[8,16,16,16]", "--set", "data.batch_size=16",
            "--set", "data.num_workers=0", "--set", "train.max_steps=3", "--set", "eval.knn.test=",
            "--set", "method_args.views={size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, "
                     "jitter_p: 0.0, gray_p: 0.0}", "--no-progress"]
    subprocess.run([*TORCHRUN, "-m", "sslhub", "train", *args, "--out", str(tmp_path / "two")], check=True,
                   env=ENV, cwd=REPO, timeout=300, capture_output=True)
    one = subprocess.run([sys.executable, "-m", "sslhub", "train", *args, "--out", str(tmp_path / "one")],
                         check=True, env={**ENV, "OMP_NUM_THREADS": "2"}, cwd=REPO, timeout=300,
                         capture_output=True, text=True)
    assert json.loads(one.stdout.strip().splitlines()[-1])["steps"] == 3
    a = load_file(tmp_path / "one/export/model.safetensors")
    b = load_file(tmp_path / "two/export/model.safetensors")
    assert json.loads((tmp_path / "two/export/config.json").read_text())["sslhub"]["processes"] == 2
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5), k


def test_a_non_finite_loss_on_one_rank_stops_both_without_a_hang(tmp_path):
    """Rank 1's loss is inf at step 2, rank 0's is finite: both stop before the update, no checkpoint holds it."""
    run = tmp_path / "run"
    args = [str(REPO / "recipes/rotation_cifar10.yaml"), "--set", "encoder.model_args.channels=[8,8,8,8]",
            "--set", "data.batch_size=32", "--set", "data.num_workers=0", "--set", "train.max_steps=5",
            "--set", "train.ckpt_every=1", "--set", "eval.knn.test=", "--set", "eval.pretext=false", "--no-progress"]
    res = subprocess.run([*TORCHRUN, str(REPO / "tests/nan_worker.py"), "inf", "train", *args, "--out", str(run)],
                         env=ENV, cwd=REPO, timeout=240, capture_output=True, text=True)
    assert res.returncode != 0
    stops = [line for line in res.stderr.splitlines() if line.startswith("sslhub: error: the gradients are not finite "
                                                                         "at step 2")]
    assert len(stops) == 2, res.stderr[-3000:]  # each process says it, neither waits for the other
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001.safetensors",
                                                                        "step-0000002.safetensors"]
    assert "the newest healthy checkpoint is" in stops[0] and "step-0000002.safetensors" in stops[0]
