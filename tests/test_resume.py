"""SIGKILL mid-run + --resume ends with the weights of an uninterrupted run; a crash mid-write loses nothing."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from conftest import REPO, TINY
from safetensors.torch import load_file

from sslhub.train.checkpoint import list_checkpoints, load_state

ARGS = [str(REPO / "recipes/simclr_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
        "--set", "train.max_steps=10", "--set", "train.ckpt_every=1", "--set", "optim.warmup_epochs=0.5",
        "--set", "eval.knn.test=", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def train(out, *extra, **kw):
    return subprocess.run([sys.executable, "-m", "sslhub", "train", *ARGS, "--out", str(out), *extra],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def weights(run):
    return load_file(run / "export" / "model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = train(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sslhub", "train", *ARGS, "--out", str(run)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if any(p.name >= "step-0000004" for p in list_checkpoints(run / "checkpoints")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = list_checkpoints(run / "checkpoints")[0]
    killed_at = load_state(ckpt)["step"]
    assert 4 <= killed_at < 10, "the run should have been killed mid-way"
    assert not (run / "export").exists()
    count = tmp_path / "count.json"
    res = subprocess.run([sys.executable, str(REPO / "tests/counting_cli.py"), str(count), "train", *ARGS, "--out",
                          str(run), "--resume"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resumed from {ckpt} at step {killed_at}/10" in res.stderr
    steps_run = json.loads(Path(f"{count}.rank0").read_text())
    assert steps_run == list(range(killed_at, 10)), "the resumed run computed only the steps not done"
    assert_same(weights(run), weights(tmp_path / "ref"))
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 11)), "metrics.csv keeps one row per step across the restart"


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    run = tmp_path / "run"
    # Die (SIGKILL, no clean-up) half-way through writing the 3rd checkpoint.
    script = textwrap.dedent(f"""
        import os, signal, sys
        import safetensors.torch as st
        import sslhub.train.checkpoint as ck
        real, calls = st.save_file, []
        def dying_save(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 3:
                with open(path, "wb") as f:
                    f.write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            real(tensors, path, metadata=metadata)
        ck.save_file = dying_save
        from sslhub.apps.cli import main
        sys.exit(main(["train", *{ARGS!r}, "--out", {str(run)!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=REPO, capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    state = load_state(list_checkpoints(run / "checkpoints")[0])
    assert state["step"] == 2, "the last complete checkpoint survives"
    res = train(run, "--resume")
    assert res.returncode == 0, res.stderr
    assert "at step 2/10" in res.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-{s:07d}.safetensors" for s in (8, 9, 10)], "half-written file removed, 3 kept"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.safetensors").write_bytes(b"\x00garbage")
    res = train(tmp_path / "run", "--resume")
    assert res.returncode == 2
    assert "last.safetensors: not a readable sslhub checkpoint" in res.stderr


def test_non_finite_loss_stops_with_a_way_forward(tmp_path, capsys):
    from sslhub.apps.cli import main
    rc = main(["train", *ARGS[:-1], "--set", "optim.lr=1.0e+30", "--set", "train.ckpt_every=100",
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"loss is (nan|-?inf) at step \d+: training stopped", err)
    assert "no healthy checkpoint was written before it" in err and "--overwrite --set optim.lr=1e+29" in err
    assert not (tmp_path / "run" / "export").exists()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]


def test_resume_under_torchrun_bf16_across_an_epoch_boundary_skips_the_done_steps(tmp_path):
    """2 processes, bf16 autocast, 1000 images at batch 128 (7 steps an epoch): a crash as step 5 starts, then
    --resume runs steps 5–9 only (each process's loss counted), crossing into epoch 2, and ends with the weights
    of an uninterrupted run."""
    args = ["train", str(REPO / "recipes/simclr_cifar10.yaml"), "--set", "encoder.model_args.channels=[8,8,8,8]",
            "--set", "data.batch_size=128", "--set", "data.num_workers=0", "--set", "method_args.views.size=16",
            "--set", "train.max_steps=10", "--set", "train.ckpt_every=1", "--set", "train.precision=bf16",
            "--set", "eval.knn.test=", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    worker = [*TORCHRUN, str(REPO / "tests/counting_cli.py")]

    def counted(name):
        return [json.loads((tmp_path / f"{name}.json.rank{r}").read_text()) for r in (0, 1)]

    ref = subprocess.run([*worker, str(tmp_path / "ref.json"), *args, "--out", str(tmp_path / "ref")], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert counted("ref") == [list(range(10))] * 2
    crash = subprocess.run([*worker, str(tmp_path / "crash.json"), *args, "--out", str(tmp_path / "run")],
                           env={**env, "SSLHUB_TEST_DIE_AT": "5"}, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert crash.returncode != 0 and not (tmp_path / "run" / "export").exists()
    res = subprocess.run([*worker, str(tmp_path / "resumed.json"), *args, "--out", str(tmp_path / "run"), "--resume"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at step 5/10" in res.stderr
    assert counted("resumed") == [list(range(5, 10))] * 2, "the resumed run computed only the steps not done"
    assert_same(weights(tmp_path / "run"), weights(tmp_path / "ref"))


def test_each_process_draws_its_own_augmentations_and_a_rerun_draws_them_again():
    """The generator of a step is seeded with (seed, step, rank): two processes at the same step draw different
    crops (identical draws would correlate the augmentations of the global batch), and the same process at
    the same step draws the same ones again (what makes --resume exact)."""
    from sslhub.data.augment import BatchAugment, ViewConfig
    from sslhub.train.trainer import step_seed

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = BatchAugment(ViewConfig(size=16))

    def draw(seed, step, rank):
        return views(images, torch.Generator().manual_seed(step_seed(seed, step, rank)))

    assert torch.equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not torch.allclose(draw(0, 3, 0), draw(0, 3, 1))
    assert not torch.allclose(draw(0, 3, 0), draw(0, 4, 0)) and not torch.allclose(draw(0, 3, 0), draw(1, 3, 0))
    assert len({step_seed(s, t, r) for s in range(3) for t in range(100) for r in range(8)}) == 3 * 100 * 8
