"""Streaming training data (sslhub.data.stream): disjoint shards per process and worker, the documented epoch
rule for unequal lanes, an order that is a function of (seed, epoch, lane, position), exact resume (SIGKILL),
2 processes equal 1, and data.cache=auto's choice."""
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, SAMPLE, TINY
from safetensors.torch import load_file
from test_clip import tiny_recipe
from test_distributed import STILL_VIEWS, assert_runs_close, train_two_and_one
from torch.utils.data import DataLoader

from sslhub.data.sources import captions_of, iter_shard
from sslhub.data.stream import LaneDataset, StreamLoader, StreamPlan, shard_counts
from sslhub.errors import SslhubError
from sslhub.eval import protocols
from sslhub.inference.load import load_encoder
from sslhub.train.checkpoint import list_checkpoints, load_state
from sslhub.train.recipe import load_recipe
from sslhub.train.trainer import Trainer, train

SAMPLES = list(iter_shard(SAMPLE / "train-00000.tar.gz"))  # 1,000 real CIFAR-10 images


def write_shards(folder: Path, sizes: list[int], bad: set[int] = frozenset(), start: int = 0) -> Path:
    """Uncompressed shards of real sample images, ``sizes[i]`` samples in shard i (keys unique over shards);
    samples numbered in ``bad`` get bytes that are not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    names, n = [], start
    for i, size in enumerate(sizes):
        names.append(f"train-{i:05d}.tar")
        with tarfile.open(folder / names[-1], "w") as tar:
            for _ in range(size):
                s = SAMPLES[n % len(SAMPLES)]
                data = b"not an image" if n in bad else s.data
                for ext, payload in (("jpg", data), ("cls", str(s.label).encode())):
                    info = tarfile.TarInfo(f"s{n:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                n += 1
    classes = json.loads((SAMPLE / "dataset.json").read_text())["classes"]
    (folder / "dataset.json").write_text(json.dumps({"classes": classes, "splits": {"train": {"shards": names}}}))
    return folder


def plan_of(folder: Path, lanes: int, batch: int, **kw) -> StreamPlan:
    shards = sorted(folder.glob("train-*.tar"))
    return StreamPlan(shards, shard_counts(shards, "train", progress=False), lanes, batch, seed=kw.pop("seed", 0),
                      size=kw.pop("size", 16), spec=str(folder), **kw)


def epoch_keys(plan: StreamPlan, epoch: int = 0, workers: int = 0) -> list[str]:
    spe = plan.steps_per_epoch
    loader = StreamLoader(plan, 0, 1, workers, epoch * spe, (epoch + 1) * spe)
    keys = [k for t in range(epoch * spe, (epoch + 1) * spe) for k in loader.rows(t).keys]
    loader.close()
    return keys


def test_unequal_lanes_follow_the_documented_drop_and_repeat_rules(tmp_path):
    """5 shards over 2 lanes: lane 0 holds shards 0, 2, 4 (64 + 64 + 40 = 168 samples), lane 1 shards 1, 3 (128);
    16 images per lane and step.  drop: 128 // 16 = 8 steps, 40 of lane 0's samples left out, none twice;
    repeat: ceil(168 / 16) = 11 steps, lane 1 starts a second pass for 176 - 128 = 48 samples."""
    folder = write_shards(tmp_path / "d", [64, 64, 64, 64, 40])
    drop = plan_of(folder, 2, 32, uneven="drop")
    assert drop.lane_sizes == [168, 128] and drop.steps_per_epoch == 8 and drop.uneven_per_epoch() == 40
    keys = epoch_keys(drop)
    assert len(keys) == 256 and len(set(keys)) == 256
    repeat = plan_of(folder, 2, 32, uneven="repeat")
    assert repeat.steps_per_epoch == 11 and repeat.uneven_per_epoch() == 8 + 48
    keys = epoch_keys(repeat)
    counts = Counter(keys)
    assert len(keys) == 352 and len(counts) == 296  # every sample at least once
    assert sum(c - 1 for c in counts.values()) == 56 and max(counts.values()) == 2
    twice = {k for k, c in counts.items() if c == 2}
    lane1 = {s.key for i in (1, 3) for s in iter_shard(folder / f"train-{i:05d}.tar")}
    assert len(twice & lane1) == 48  # lane 1's second pass (and lane 0's 8 extra draws)


def test_two_processes_with_two_workers_each_read_disjoint_shards_and_see_every_sample_once(tmp_path):
    """8 shards of 32, 4 lanes of 64, 2 processes x 2 DataLoader workers: one epoch (8 steps of 32) shows every
    sample exactly once over the four workers, and no shard is read by two workers."""
    folder = write_shards(tmp_path / "d", [32] * 8)
    plan = plan_of(folder, 4, 32)
    assert plan.steps_per_epoch == 8
    by_worker: dict[int, list[str]] = {}
    for rank in (0, 1):
        loader = DataLoader(LaneDataset(plan, plan.lanes_of(rank, 2), 0, 8, {}), batch_size=None, num_workers=2)
        for item in loader:
            for chunk in item["lanes"].values():
                by_worker.setdefault(item["worker"], []).extend(chunk["keys"])
    assert len(by_worker) == 4  # four worker processes
    every = [k for keys in by_worker.values() for k in keys]
    assert len(every) == 256 and len(set(every)) == 256  # all seen, none twice
    shards_of = {w: {k.split(":")[0] for k in keys} for w, keys in by_worker.items()}
    assert all(len(s) == 2 for s in shards_of.values())
    assert len(set().union(*shards_of.values())) == 8  # the workers' shards do not overlap


def test_the_order_is_a_function_of_seed_and_epoch_and_mixes_shards(tmp_path):
    folder = write_shards(tmp_path / "d", [48] * 4)
    plan = plan_of(folder, 2, 16)
    e0, e1 = epoch_keys(plan, 0), epoch_keys(plan, 1)
    assert e0 == epoch_keys(plan, 0)  # the same run again: the same order
    assert e0 != e1 and sorted(e0) == sorted(e1)  # another epoch: another order of the same samples
    assert epoch_keys(plan_of(folder, 2, 16, seed=1), 0) != e0
    first = e0[:8]  # lane 0's first chunk: drawn from both of its shards, not in file order
    assert len({k.split(":")[0] for k in first}) == 2 and first != sorted(first)
    no_buffer = plan_of(folder, 2, 16, buffer=1)  # each shard read in file order, the shards in a drawn order
    firsts = [tuple(k.split(":")[0] for k in epoch_keys(no_buffer, e)[::8][:2]) for e in range(4)]
    assert len(set(firsts)) > 1, firsts  # the lanes start with one or the other of their shards, by epoch
    in_order = epoch_keys(no_buffer, 0)
    assert in_order[:8] == sorted(in_order[:8])


def test_resuming_from_any_recorded_position_continues_the_same_rows_despite_an_unreadable_image(tmp_path):
    """Positions are recorded, not computed: lane 0 meets a bad image, so after it the lane has drawn one more
    sample than steps × 8; a loader started at every step from the positions saved after the step before gives
    the rows of the uninterrupted run, across the epoch boundary."""
    folder = write_shards(tmp_path / "d", [24] * 4, bad={5})
    plan = plan_of(folder, 2, 16)
    total = plan.steps_per_epoch + 3
    full = StreamLoader(plan, 0, 1, 0, 0, total)
    rows, positions = [], []
    for t in range(total):
        rows.append(full.rows(t).keys)
        positions.append(dict(full.positions))
    assert any(d != (t + 1 - e * plan.steps_per_epoch) * 8 for t, p in enumerate(positions) for e, d in p.values())
    for t in range(1, total):
        again = StreamLoader(plan, 0, 1, 0, t, total, positions[t - 1])
        assert [again.rows(s).keys for s in range(t, total)] == rows[t:], f"resumed at step {t}"


ARGS = [str(REPO / "recipes/simclr_cifar10.yaml"), *sum((["--set", s] for s in TINY), []),
        "--set", "data.batch_size=16", "--set", "data.cache=stream", "--set", "data.num_workers=2",  # 2 lanes
        "--set", "train.max_steps=10", "--set", "train.ckpt_every=1", "--set", "optim.warmup_epochs=0.5",
        "--set", "eval.knn.test=", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


def test_sigkill_then_resume_while_streaming_matches_uninterrupted(tmp_path):
    """4 shards of 24 (one image unreadable) → 6 steps an epoch: 10 steps cross an epoch boundary; killed
    mid-run and resumed, the weights equal an uninterrupted run's, bit for bit."""
    data = write_shards(tmp_path / "d", [24] * 4, bad={30})
    args = [*ARGS, "--set", f"data.train={data}"]
    ref = subprocess.run([sys.executable, "-m", "sslhub", "train", *args, "--out", str(tmp_path / "ref")],
                         env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert "6 steps an epoch" in ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sslhub", "train", *args, "--out", str(run)], env=ENV, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name >= "step-0000003" for p in list_checkpoints(run / "checkpoints")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_state(list_checkpoints(run / "checkpoints")[0])
    assert 3 <= state["step"] < 10 and state["data_mode"] == "stream" and state["data_lanes"] == 2
    assert state["data"]["positions"].shape == (2, 2)
    # resumed with another number of workers (data.num_workers may change): the lanes, and so the order, stay
    res = subprocess.run([sys.executable, "-m", "sslhub", "train", *args, "--out", str(run), "--resume",
                          "--set", "data.num_workers=1"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"at step {state['step']}/10" in res.stderr
    a, b = load_file(tmp_path / "ref/export/model.safetensors"), load_file(run / "export/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_streaming_training_equals_one_process(tmp_path):
    """2 processes reading one lane each = 1 process reading both lanes in 2 DataLoader workers: every checkpoint
    and the export (SimCLR: negatives and global BN over the step's whole batch)."""
    data = write_shards(tmp_path / "d", [32] * 4)
    sets = ["encoder.model_args.channels=[8,16,16,16]", "encoder.model_args.zero_init_last=false",
            "encoder.model_args.act_layer=silu", "data.batch_size=16", f"method_args.views={STILL_VIEWS}",
            f"data.train={data}", "data.cache=stream", "data.lanes=2"]
    one, two, moved = train_two_and_one(tmp_path, "recipes/simclr_cifar10.yaml", sets, ["data.num_workers=2"])
    positions = [load_state(tmp_path / run / "checkpoints/step-0000004.safetensors")["data"]["positions"]
                 for run in ("one", "two")]
    assert torch.equal(positions[0], positions[1]) and positions[0][:, 1].tolist() == [32, 32]
    assert_runs_close(tmp_path, one, two, moved, "simclr streaming")


def trainer(data, tmp_path, *sets) -> Trainer:
    recipe = load_recipe(REPO / "recipes/simclr_cifar10.yaml", [*TINY, f"data.train={data}", *sets])
    return Trainer(recipe, tmp_path / "run", progress=False)


def test_cache_auto_decides_by_the_decoded_size_and_says_why(tmp_path, caplog):
    data = write_shards(tmp_path / "d", [40] * 2)  # 80 images x 3 x 32 x 32 = 0.23 MB decoded
    with caplog.at_level(logging.INFO, logger="sslhub.train"):
        assert trainer(data, tmp_path, "data.cache_limit_mb=0.2").cache_mode([data / "train-00000.tar"] * 2) == "stream"
        assert trainer(data, tmp_path, "data.cache_limit_mb=0.3").cache_mode([data / "train-00000.tar"] * 2) == "memory"
    said = [r.getMessage() for r in caplog.records if "data.cache=auto" in r.getMessage()]
    assert "stream (80 images decoded at 32 px take 0 MB" in said[0] and "> data.cache_limit_mb=0" in said[0]
    assert said[1].startswith("data.cache=auto: memory") and "≤" in said[1]
    assert trainer(SAMPLE.parent, tmp_path).cache_mode([]) == "memory"  # not shards
    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["train"]["n"] = 10_000_000  # the size dataset.json states is taken as is (no count)
    (data / "dataset.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sslhub.train"):
        assert trainer(data, tmp_path, "data.cache_limit_mb=20000").cache_mode(sorted(data.glob("*.tar"))) == "stream"
    assert "10,000,000 images decoded at 32 px take 29297 MB" in caplog.text


def test_streaming_refuses_what_it_cannot_do_with_a_clear_error(tmp_path):
    data = write_shards(tmp_path / "d", [40] * 2)
    with pytest.raises(SslhubError, match="data.cache=stream reads WebDataset shards"):
        trainer(REPO / "data", tmp_path, "data.cache=stream").cache_mode([])
    with pytest.raises(SslhubError, match="data.lanes=3 exceeds its 2 shard"):
        plan_of(data, 3, 30)
    with pytest.raises(SslhubError, match="does not divide the step.s batch of 33"):
        plan_of(data, 2, 33)
    with pytest.raises(SslhubError, match="not a multiple of the 2 processes"):
        plan_of(data, 1, 32).lanes_of(0, 2)


def test_resume_after_the_data_changed_is_refused(tmp_path):
    data = write_shards(tmp_path / "d", [32] * 2)
    sets = [*TINY, f"data.train={data}", "data.cache=stream", "data.lanes=2", "data.batch_size=16",
            "train.max_steps=2", "train.ckpt_every=1", "eval.knn.test="]
    recipe = load_recipe(REPO / "recipes/simclr_cifar10.yaml", sets)
    train(recipe, tmp_path / "run", progress=False)
    write_shards(data, [32, 33])  # one more sample in the second shard
    longer = load_recipe(REPO / "recipes/simclr_cifar10.yaml", [*sets, "train.max_steps=3"])
    with pytest.raises(SslhubError, match="was written while streaming other data"):
        train(longer, tmp_path / "run", resume=True, progress=False)


@pytest.mark.slow
def test_streamed_image_text_rows_carry_their_own_captions_and_clip_trains_on_them(tmp_path):
    flickr = REPO / "data/flickr8k-sample"
    shard = flickr / "train-00000.tar.gz"
    by_key = {s.key: s for s in iter_shard(shard)}
    plan = StreamPlan([shard], shard_counts([shard], "train", progress=False), 1, 16, seed=0, size=32, spec=str(flickr))
    rows = StreamLoader(plan, 0, 1, 0, 0, 2, texts=True).rows(0)
    assert rows.texts is not None and len(rows.texts) == 16
    assert all(t == captions_of(by_key[k]) and len(t) == 5 for t, k in zip(rows.texts, rows.keys))
    recipe = tiny_recipe(tmp_path, f"data.train={flickr}", "data.cache=stream", "data.batch_size=16",
                         "data.num_workers=0", "train.max_steps=2", "eval.knn.test=", "eval.zeroshot=[]",
                         "eval.retrieval.data=")
    assert train(recipe, tmp_path / "run", progress=False)["steps"] == 2


def test_a_streaming_run_measures_knn_without_decoding_its_bank_and_gets_the_decoded_figures(tmp_path, monkeypatch):
    """The k-NN bank of a streaming run (its training data) is embedded as it streams: only embeddings are held,
    and the figures equal k-NN over the decoded bank."""
    data = write_shards(tmp_path / "d", [160] * 2)
    shutil.copy(SAMPLE / "test-00000.tar.gz", data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["splits"]["test"] = {"shards": ["test-00000.tar.gz"]}
    (data / "dataset.json").write_text(json.dumps(meta))
    decoded = []
    real_decode = protocols.decode
    monkeypatch.setattr(protocols, "decode", lambda enc, spec, split, *a, **k: decoded.append(split) or
                        real_decode(enc, spec, split, *a, **k))
    recipe = load_recipe(REPO / "recipes/simclr_cifar10.yaml", [*TINY, f"data.train={data}", "data.cache=stream",
                                                                "data.lanes=2", "train.max_steps=2"])
    got = train(recipe, tmp_path / "run", progress=False)["knn"]
    assert "train" not in decoded and got["bank_size"] == 320
    monkeypatch.undo()
    want = protocols.knn(load_encoder(tmp_path / "run/export"), str(data), "train", str(data), "test", progress=False)
    assert {k: v for k, v in got.items() if "@" in k} == {k: v for k, v in want.items() if "@" in k}
