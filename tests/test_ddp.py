"""``train.parallel: ddp``: DistributedDataParallel on the training path, 2 processes (torchrun, gloo on CPU) equal 1.

Each torchrun run goes through ``tests/ddp_worker.py``, which records in order every micro-batch forward through
DDP, every bucket DDP all-reduces and every hand-written flat all-reduce, so a test sees *how* the gradients were
averaged, not only that the numbers agree: DDP from the second step (the first averages by hand and finds the
parameters without gradients), one reduction per step after its last micro-batch (``no_sync`` before), never a
second averaging in ``apply_update``.  The same runs with ``manual`` are in test_distributed.py, against the same
one-process runs, so DDP equals manual too.
"""
import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_distributed import (ENV, STILL_VIEWS, TORCHRUN, TRAIN_STEPS, assert_runs_close, assert_states_close,
                              states_and_moved)

from sslhub.config import ConfigError
from sslhub.train.parallel import Parallel, choose
from sslhub.train.recipe import recipe_from_dict

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY_RESNET = ["encoder.model_args.channels=[8,16,16,16]", "encoder.model_args.zero_init_last=false",
               "encoder.model_args.act_layer=silu", "data.batch_size=16"]  # as test_distributed's trainer runs
TINY_MAE = ["encoder.image_size=32", "encoder.model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
            "method_args.decoder_dim=32", "method_args.decoder_depth=1", "method_args.decoder_heads=2",
            "optim.warmup_epochs=0", "optim.name=sgd", "optim.lr=0.5",  # SGD: see test_distributed's MAE test
            "method_args.views={size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, "
            "gray_p: 0.0}"]


# ---------------------------------------------------------------- the choice rule (no processes)
def test_the_choice_rule():
    assert choose("ddp", CPU, 1, 1)[0] == choose("auto", CUDA, 1, 1)[0] == "single"  # one process: plain path
    assert choose("auto", CUDA, 2, 1)[0] == "ddp"
    assert choose("auto", CPU, 2, 1)[0] == "manual"
    assert choose("ddp", CPU, 2, 1)[0] == "ddp"  # asked: gloo on CPU
    assert choose("manual", CUDA, 2, 1)[0] == "manual"
    assert choose("auto", CUDA, 2, 2)[0] == "manual"  # two optimisers: hand-written averaging


def test_ddp_with_two_optimisers_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"train.parallel=ddp: this method has 2 optimisers.*train.parallel=manual"):
        choose("ddp", CUDA, 2, 2)


def test_the_recipe_field():
    assert recipe_from_dict({"method": "simclr"}).train.parallel == "auto"
    assert recipe_from_dict({"method": "simclr"}, overrides=["train.parallel=ddp"]).train.parallel == "ddp"
    with pytest.raises(ConfigError, match="train.parallel"):
        recipe_from_dict({"method": "simclr"}, overrides=["train.parallel=fsdp"])


def test_one_process_runs_the_method_itself():
    method = torch.nn.Linear(2, 2)
    method.optim_groups = lambda: {"loss": list(method.parameters())}
    p = Parallel.create(method, "ddp", CPU)
    assert p.mode == "single" and p.ddp is None and not p.averages_in_backward
    p.after_reduction()
    with p.micro_batch(last=False):
        assert p.ddp is None


# ---------------------------------------------------------------- torchrun
def train_ddp_and_one(tmp_path, recipe: str, sets: list[str], one_sets: list[str] = ()) -> tuple[dict, dict, dict]:
    """``recipe`` trained by 2 processes with ``train.parallel=ddp`` (through ddp_worker) and by 1 process (with
    ``one_sets`` on top); like test_distributed.train_two_and_one."""
    sets = [*sets, "data.num_workers=0", f"train.max_steps={TRAIN_STEPS}", "train.ckpt_every=1",
            f"train.keep_checkpoints={TRAIN_STEPS}", "eval.knn.test=", "eval.pretext=false"]
    args = [str(REPO / recipe), *(a for s in sets for a in ("--set", s)), "--no-progress"]
    two = subprocess.run([*TORCHRUN, str(REPO / "tests/ddp_worker.py"), str(tmp_path), "train", *args,
                          "--set", "train.parallel=ddp", "--out", str(tmp_path / "two")],
                         env=ENV, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "train.parallel=ddp → ddp (2 processes)" in two.stderr
    one_args = [*args, *(a for s in one_sets for a in ("--set", s))]
    subprocess.run([sys.executable, "-m", "sslhub", "train", *one_args, "--out", str(tmp_path / "one")], check=True,
                   env={**ENV, "OMP_NUM_THREADS": "2"}, cwd=REPO, timeout=300, capture_output=True)
    return states_and_moved(tmp_path)


def assert_reduced_by_ddp(tmp_path, accumulate: int, find_unused: bool = False) -> None:
    """On each process: step 0 averaged by hand (one flat all-reduce of every gradient); then one DDP built (with
    ``find_unused``) and, each later step, ``accumulate`` forwards through it followed by bucket all-reduces that
    cover every trainable parameter once: none between the micro-batches (``no_sync``), no hand-written averaging again.
    Every buffer is the same on both processes (DDP does not copy rank 0's)."""
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        [[name, unused, n_trainable]] = got["wrappers"]
        assert name == "CountingDDP" and unused == find_unused
        (first, n_grad), *events = got["events"]
        # step 0's averaging covers the gradients there were; DDP's buckets every trainable parameter (zeros for
        # one that got no gradient)
        assert first == "average" and (n_grad < n_trainable if find_unused else n_grad == n_trainable)
        seq = []  # consecutive bucket all-reduces merged: how many gradient entries each reduction covered
        for kind, x in events:
            if kind == "reduce" and seq and seq[-1][0] == "reduce":
                seq[-1][1] += x
            else:
                seq.append([kind, x])
        want = [e for s in range(1, TRAIN_STEPS) for e in [["loss", s]] * accumulate + [["reduce", n_trainable]]]
        assert seq == want
    assert ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys()
    for k, stats in ranks[0]["buffers"].items():
        assert stats == pytest.approx(ranks[1]["buffers"][k], rel=1e-6, abs=1e-9), k


def test_ddp_mae_with_accumulation_equals_one_process(tmp_path):
    """MAE (a ViT, per-sample loss, a frozen position embedding DDP ignores): 2 processes x 2 micro-batches of 4
    images under DDP equal 1 process x 16 images, step for step and in the export; DDP reduced once per step."""
    one, two, moved = train_ddp_and_one(tmp_path, "recipes/mae_imagenette.yaml",
                                        [*TINY_MAE, "data.batch_size=8", "train.accumulate=2"],
                                        ["data.batch_size=16", "train.accumulate=1"])
    assert moved["backbone.model.blocks.0.attn.qkv.weight"] > 0 and moved["decoder.pred.weight"] > 0
    assert_runs_close(tmp_path, one, two, moved, "mae, ddp")
    assert_reduced_by_ddp(tmp_path, accumulate=2)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both_under_ddp(tmp_path):
    """Rank 1's loss is inf at step 2, a DDP step: the NaN goes into a gradient before DDP averages it, so both
    processes stop before the update (a NaN added after the averaging would stop rank 1 only: rank 0 would wait
    for it at step 3 until the timeout)."""
    run = tmp_path / "run"
    args = [str(REPO / "recipes/rotation_cifar10.yaml"), "--set", "encoder.model_args.channels=[8,8,8,8]",
            "--set", "data.batch_size=32", "--set", "data.num_workers=0", "--set", "train.max_steps=5",
            "--set", "train.ckpt_every=1", "--set", "eval.knn.test=", "--set", "eval.pretext=false",
            "--set", "train.parallel=ddp", "--no-progress"]
    res = subprocess.run([*TORCHRUN, str(REPO / "tests/nan_worker.py"), "inf", "train", *args, "--out", str(run)],
                         check=False, env=ENV, cwd=REPO, timeout=240, capture_output=True, text=True)
    assert res.returncode != 0
    assert "train.parallel=ddp → ddp" in res.stderr and "DDP from the next step" in res.stderr
    stops = res.stderr.split("sslhub: error: the gradients are not finite at step 2")[1:]
    assert len(stops) == 2, res.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001.safetensors",
                                                                        "step-0000002.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_ddp_training_equals_one_process(tmp_path, method):
    """SimCLR (global BN, negatives gathered from both processes during DDP's backward) and BYOL (an EMA target
    with requires_grad=False, LARS) under DDP equal 1 process at the same global batch."""
    sets = [*TINY_RESNET, f"method_args.views={STILL_VIEWS}"]
    if method == "byol":
        sets += [f"method_args.views_prime={STILL_VIEWS}", "method_args.proj_hidden_dim=64",
                 "method_args.pred_hidden_dim=64"]
    one, two, moved = train_ddp_and_one(tmp_path, f"recipes/{method}_cifar10.yaml", sets)
    assert_runs_close(tmp_path, one, two, moved, f"{method}, ddp")
    assert_reduced_by_ddp(tmp_path, accumulate=1)


@pytest.mark.slow
def test_ddp_finds_parameters_frozen_in_the_first_steps(tmp_path):
    """DINO's last layer is frozen for its first ``freeze_last_layer_epochs`` (here 3 of the 4 steps): the first
    step shows it without a gradient, DDP is built with find_unused_parameters=True (without it DDP stops at the
    next step), and the runs still equal one process, the last layer moving only at step 4."""
    sets = [*TINY_RESNET, f"method_args.views={STILL_VIEWS}", f"method_args.views2={STILL_VIEWS}",
            "method_args.n_local_views=0",
            "method_args.out_dim=64", "method_args.hidden_dim=64", "method_args.bottleneck_dim=32",
            "method_args.freeze_last_layer_epochs=0.045"]  # 62 steps an epoch: steps 0-2
    one, two, moved = train_ddp_and_one(tmp_path, "recipes/dino_cifar10.yaml", sets)
    for step in range(1, TRAIN_STEPS + 1):  # every checkpoint (DINO exports its teacher: assert_runs_close's
        assert_states_close(two[step], one[step], moved, f"dino, ddp, after step {step}")  # export check is not for it)
    last = "head.last_layer.weight_v"
    assert torch.equal(one[3][last], one[1][last]) and not torch.equal(one[4][last], one[3][last])
    assert_reduced_by_ddp(tmp_path, accumulate=1, find_unused=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_through_c10d_rendezvous(tmp_path):
    """docs/distributed.md's two-node commands, both "nodes" on this machine: two torchrun agents, one process
    each, meet at one c10d endpoint and train together (2 processes, DDP)."""
    port = free_port()
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "sslhub-test",
           "-m", "sslhub", "train", str(REPO / "recipes/rotation_cifar10.yaml"),
           "--set", "encoder.model_args.channels=[8,8,8,8]", "--set", "data.batch_size=16", "--set",
           "data.num_workers=0", "--set", "train.max_steps=2", "--set", "eval.knn.test=", "--set",
           "eval.pretext=false", "--set", "train.parallel=ddp", "--no-progress", "--out", str(out)]
    nodes = [subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(err[-2000:] for _, err in results)
    config = json.loads((out / "export/config.json").read_text())["sslhub"]
    assert config["processes"] == 2 and config["steps"] == 2
    assert any("train.parallel=ddp → ddp (2 processes)" in err for _, err in results)
