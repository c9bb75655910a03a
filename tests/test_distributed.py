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
from sslhub.train.checkpoint import load_state

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


# The trainer-level comparison: SimCLR (negatives gathered from both processes), BYOL (an EMA target on the
# trainer's cosine momentum schedule, LARS), MoCo v2 (an EMA key encoder, a queue of the global batch's keys,
# shuffling BN over 8 groups).  Heads narrowed for time; timm's zero-initialised last BN of each residual
# branch starts at 1, so the branches' weights move from the first update (as in dist_worker.build).  The
# backbone's activation is SiLU, not ReLU: ~1M ReLU inputs per forward here, about one of them within float32
# rounding of 0, where the order of the sums decides the derivative (0 or 1); such a flip moves a step's
# gradients by up to ~1 % and the gap then grows ~5x a step.  With ReLU, SimCLR's two processes ended 4 % of
# the update apart after 4 steps (one process at 1 vs 2 threads: 0.3 %, growing alike); with SiLU, 1e-4.
TRAINED = {"simclr": [], "byol": ["method_args.proj_hidden_dim=64", "method_args.pred_hidden_dim=64"],
           "moco_v2": ["method_args.proj_hidden_dim=64"]}
TRAIN_STEPS = 4
STILL_VIEWS = ("{size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, gray_p: 0.0, "
               "blur_p: 0.0, solarize_p: 0.0}")  # each rank draws its own augmentations: none here


def assert_states_close(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor], moved: dict[str, float],
                        what: str) -> None:
    """Two processes' state vs one process's, tensor by tensor, against how far training moved that tensor.

    ``moved[k]``: the largest change of tensor ``k`` in the one-process run from the first checkpoint (after
    step 1, whose learning rate is 0 when the recipe warms up) to the last.  The tolerance is 1e-2 of it:
    float32 rounding is 1e-4 of it and below, while a missing gradient average, gradients off by the number of
    processes, a target BN with per-rank statistics or a queue of one rank's keys came out 6 % to 76 % of it.
    Its floor is 1e-5 of the tensor's largest entry (tens of float32 ulps of the weight itself: a BN weight
    near 1 that moves 1e-6 in these steps is only rounding apart), so a tensor that does not move (a bias
    followed by batch norm, 0 gradient in exact arithmetic) is held to the rounding of its values.  Integer
    tensors (queue pointer, batch counters) are equal."""
    assert two.keys() == one.keys(), f"{what}: {sorted(set(two) ^ set(one))}"
    for k, want in one.items():
        if not want.is_floating_point():
            assert torch.equal(two[k], want), f"{what}, {k}: {two[k].tolist()} vs {want.tolist()}"
            continue
        diff = (two[k].double() - want.double()).abs().max().item()
        tol = max(1e-2 * moved[k], 1e-5 * want.abs().max().item(), 1e-12)
        assert diff <= tol, f"{what}, {k}: max diff {diff:.3g}, the tensor moved {moved[k]:.3g} after step 1"


def train_two_and_one(tmp_path, recipe: str, sets: list[str], one_sets: list[str] = ()) -> tuple[dict, dict, dict]:
    """``recipe`` with ``sets`` trained by 2 processes and by 1 (with ``one_sets`` on top); every checkpoint's
    model state of both runs by step, and how far each tensor moved in the one-process run from step 1."""
    sets = [*sets, "data.num_workers=0", f"train.max_steps={TRAIN_STEPS}", "train.ckpt_every=1",
            f"train.keep_checkpoints={TRAIN_STEPS}", "eval.knn.test="]
    args = [str(REPO / recipe), *(a for s in sets for a in ("--set", s)), "--no-progress"]
    subprocess.run([*TORCHRUN, "-m", "sslhub", "train", *args, "--out", str(tmp_path / "two")], check=True,
                   env=ENV, cwd=REPO, timeout=300, capture_output=True)
    one_args = [*args, *(a for s in one_sets for a in ("--set", s))]
    one = subprocess.run([sys.executable, "-m", "sslhub", "train", *one_args, "--out", str(tmp_path / "one")],
                         check=True, env={**ENV, "OMP_NUM_THREADS": "2"}, cwd=REPO, timeout=300,
                         capture_output=True, text=True)
    assert json.loads(one.stdout.strip().splitlines()[-1])["steps"] == TRAIN_STEPS
    return states_and_moved(tmp_path)


def states_and_moved(tmp_path) -> tuple[dict, dict, dict]:
    """The model state of every checkpoint of runs ``one`` and ``two`` (2 processes) by step, and how far each
    tensor moved in the one-process run from step 1."""
    assert json.loads((tmp_path / "two/export/config.json").read_text())["sslhub"]["processes"] == 2
    states = {run: {int(p.stem.split("-")[1]): load_state(p)["model"]
                    for p in (tmp_path / run / "checkpoints").glob("step-*.safetensors")} for run in ("one", "two")}
    assert sorted(states["one"]) == sorted(states["two"]) == list(range(1, TRAIN_STEPS + 1))
    first, last = states["one"][1], states["one"][TRAIN_STEPS]
    moved = {k: (last[k].double() - first[k].double()).abs().max().item() for k in last if last[k].is_floating_point()}
    return states["one"], states["two"], moved


def assert_runs_close(tmp_path, one: dict, two: dict, moved: dict, what: str) -> None:
    """Every checkpoint and the export (the online backbone of the last step) of the two runs."""
    for step in range(1, TRAIN_STEPS + 1):
        assert_states_close(two[step], one[step], moved, f"{what}, after step {step}")
    a = load_file(tmp_path / "one/export/model.safetensors")
    b = load_file(tmp_path / "two/export/model.safetensors")
    assert all(torch.equal(v, one[TRAIN_STEPS][f"backbone.model.{k}"]) for k, v in a.items())
    assert_states_close(b, a, {k: moved[f"backbone.model.{k}"] for k in a if a[k].is_floating_point()},
                        f"{what}, export")


@pytest.mark.parametrize("method", list(TRAINED))
def test_torchrun_training_equals_one_process(tmp_path, method):
    """The whole trainer: 2 processes x 8 images = 1 process x 16 images, step for step: every checkpoint's
    model state (online and momentum weights, BN statistics, queue) and the export."""
    sets = ["encoder.model_args.channels=[8,16,16,16]", "encoder.model_args.zero_init_last=false",
            "encoder.model_args.act_layer=silu", "data.batch_size=16", f"method_args.views={STILL_VIEWS}",
            *([f"method_args.views_prime={STILL_VIEWS}"] if method == "byol" else []), *TRAINED[method]]
    one, two, moved = train_two_and_one(tmp_path, f"recipes/{method}_cifar10.yaml", sets)
    convs = [k for k in moved if k.startswith("backbone.") and "conv" in k]
    assert convs and all(moved[k] > 0 for k in convs)  # every convolution trained, residual branches too
    assert_runs_close(tmp_path, one, two, moved, method)


def test_torchrun_mae_equals_one_process_with_accumulation(tmp_path):
    """MAE's masks are keyed to each image's place in the step's global batch (``Batch.seed``/``offset``): 2
    processes x 8 images and 1 process x 2 micro-batches of 8 (``train.accumulate=2``) hide the same patches of
    the same images, so the runs agree step for step (a ViT has no batch norm: per-sample loss, exact)."""
    sets = ["encoder.image_size=32", "encoder.model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
            "method_args.decoder_dim=32", "method_args.decoder_depth=1", "method_args.decoder_heads=2",
            # SGD, not the recipe's AdamW: Adam's first steps are ≈ lr·sign(g), and the sign of a gradient element
            # within float32 rounding of 0 (the order of the sums decides it) would move it by a whole lr
            "data.batch_size=16", "optim.warmup_epochs=0", "optim.name=sgd", "optim.lr=0.5",
            "method_args.views={size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, "
            "gray_p: 0.0}"]
    one, two, moved = train_two_and_one(tmp_path, "recipes/mae_imagenette.yaml", sets,
                                        ["data.batch_size=8", "train.accumulate=2"])
    assert moved["backbone.model.blocks.0.attn.qkv.weight"] > 0 and moved["decoder.pred.weight"] > 0
    assert_runs_close(tmp_path, one, two, moved, "mae")


def test_a_non_finite_loss_on_one_rank_stops_both_without_a_hang(tmp_path):
    """Rank 1's loss is inf at step 2, rank 0's is finite: both stop before the update, no checkpoint holds it."""
    run = tmp_path / "run"
    args = [str(REPO / "recipes/rotation_cifar10.yaml"), "--set", "encoder.model_args.channels=[8,8,8,8]",
            "--set", "data.batch_size=32", "--set", "data.num_workers=0", "--set", "train.max_steps=5",
            "--set", "train.ckpt_every=1", "--set", "eval.knn.test=", "--set", "eval.pretext=false", "--no-progress"]
    res = subprocess.run([*TORCHRUN, str(REPO / "tests/nan_worker.py"), "inf", "train", *args, "--out", str(run)],
                         check=False, env=ENV, cwd=REPO, timeout=240, capture_output=True, text=True)
    assert res.returncode != 0
    # each process says it, neither waits for the other; the two writes to the shared stderr can land on one line
    stops = res.stderr.split("sslhub: error: the gradients are not finite at step 2")[1:]
    assert len(stops) == 2, res.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001.safetensors",
                                                                        "step-0000002.safetensors"]
    assert "the newest healthy checkpoint is" in stops[0] and "step-0000002.safetensors" in stops[0]
