"""`sslhub embed`: embeddings equal the encoder applied directly, resume after a crash, torchrun = 1 process,
the on-disk format's checks (bench/make_big_shards.py makes the multi-shard data)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE, run_cli
from PIL import Image

from sslhub.apps.cli import main as cli_main
from sslhub.data.sources import count_shard, iter_shard
from sslhub.eval import protocols
from sslhub.inference import embeddings as E
from sslhub.inference.embed import check_manifest
from sslhub.inference.embeddings import EmbeddingsError
from sslhub.inference.load import load_encoder
from sslhub.models.backbone import Backbone, EncoderConfig
from sslhub.publish.export import export_encoder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FP16 = 2e-3  # float16 rounding of unit-norm vectors is <= 2**-11 ≈ 5e-4 per entry


def make_big_shards():
    spec = importlib.util.spec_from_file_location("make_big_shards", REPO / "bench" / "make_big_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    """A random-weight CIFAR-stem ResNet-18 export, 32-dim features."""
    torch.manual_seed(0)
    backbone = Backbone(EncoderConfig(arch="resnet18", cifar_stem=True, image_size=32,
                                      model_args={"channels": [8, 8, 16, 32]}))
    return str(export_encoder(backbone, tmp_path_factory.mktemp("embed") / "export", {"method": "simclr", "steps": 0}))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """900 real CIFAR-10 samples (the bundled test split's 500, repeated) in 3 uncompressed shards of 300."""
    out = tmp_path_factory.mktemp("data") / "cifar900"
    make_big_shards().make(900, out, src=SAMPLE, split="test", per_shard=300)
    return out


@pytest.fixture(scope="module")
def reference(export, shards, tmp_path_factory) -> Path:
    """One uninterrupted single-process run over ``shards``."""
    out = tmp_path_factory.mktemp("ref") / "emb"
    run_cli("embed", "--model", export, "--data", str(shards), "--out", str(out), "--workers", "0", "--no-progress")
    return out


def load_all(folder: Path) -> tuple[np.ndarray, list[dict]]:
    parts = list(E.iter_embedding_shards(folder))
    return np.concatenate([np.asarray(a) for _, a, _ in parts]), [r for _, _, rows in parts for r in rows]


def assert_same_embeddings(a: Path, b: Path) -> None:
    xa, ra = load_all(a)
    xb, rb = load_all(b)
    assert ra == rb
    assert np.array_equal(xa, xb), f"max diff {np.abs(xa.astype(np.float32) - xb).max()}"


def stats(folder: Path, name: str) -> dict:
    return {s: (folder / f"{name}{s}").stat().st_mtime_ns for s in (".npy", ".jsonl", ".done.json")}


def test_make_big_shards_repeats_under_new_keys(shards):
    meta = json.loads((shards / "dataset.json").read_text())
    assert meta["splits"]["train"] == {"n": 900, "shards": ["train-00000.tar", "train-00001.tar", "train-00002.tar"],
                                       "counts": [300, 300, 300]}
    assert [count_shard(shards / p) for p in meta["splits"]["train"]["shards"]] == [300, 300, 300]
    assert len(meta["classes"]) == 10
    keys = [s.key.split(":", 1)[1] for p in meta["splits"]["train"]["shards"] for s in iter_shard(shards / p)]
    source = [s.key.split(":", 1)[1] for s in iter_shard(SAMPLE / "test-00000.tar.gz")]
    assert len(keys) == len(set(keys)) == 900
    assert keys == [f"{i // 500:03d}_{source[i % 500]}" for i in range(900)]


# ------------------------------------------------------------------------ equal to the encoder applied directly
@pytest.mark.parametrize("dtype,normalize,workers", [("float16", True, "2"), ("float32", False, "0")])
def test_embeddings_equal_the_encoder_on_decoded_images(export, tmp_path, dtype, normalize, workers):
    """Rows in data order (with 2 workers: batches of 32 striped across them), values as the encoder's."""
    out = tmp_path / "emb"
    res = run_cli("embed", "--model", export, "--data", str(SAMPLE), "--split", "test", "--out", str(out),
                  "--batch-size", "32", "--workers", workers, "--dtype", dtype,
                  *([] if normalize else ["--no-normalize"]), "--no-progress")
    assert res["images"] == res["embeddings"] == 500 and res["shards_done"] == 1 and res["skipped"] == 0
    enc = load_encoder(export)
    data = protocols.decode(enc, str(SAMPLE), "test", workers=0, progress=False)
    want = enc.embed_images(data.images, batch_size=256, normalize=normalize, progress=False).numpy()
    x, rows = load_all(out)
    assert x.dtype == np.dtype(dtype) and x.shape == (500, 32)
    assert [r["id"] for r in rows] == [k.split(":", 1)[1] for k in data.keys]
    assert [r["label"] for r in rows] == data.labels.tolist()
    assert {r["source"] for r in rows} == {"test-00000.tar.gz"}
    diff = np.abs(x.astype(np.float64) - want).max()
    assert diff < (FP16 if dtype == "float16" else 1e-5 * np.abs(want).max())
    norms = np.linalg.norm(want, axis=1)
    if normalize:  # the effect checked is far above the tolerance: raw features are not unit vectors
        raw = enc.embed_images(data.images[:50], normalize=False, progress=False).norm(dim=1)
        assert (raw - 1).abs().max() > 50 * FP16
        assert np.allclose(norms, 1, atol=1e-5)
    manifest = E.read_manifest(out)
    assert (manifest["dim"], manifest["dtype"], manifest["normalized"], manifest["shards"]) == \
           (32, dtype, normalize, ["00000"])


def test_image_folder_is_cut_into_chunks_and_bad_images_are_counted(export, tmp_path, caplog):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    (root / "dog" / "99.png").write_bytes(b"not an image")
    res = run_cli("embed", "--model", export, "--data", str(root), "--out", str(tmp_path / "emb"), "--chunk", "10",
                  "--workers", "0", "--batch-size", "4", "--no-progress")
    assert (res["images"], res["skipped"], res["shards"]) == (24, 1, 3)
    assert "dog/99.png" in caplog.text and "skipped 1" in caplog.text
    x, rows = load_all(tmp_path / "emb")
    assert len(x) == 24 and rows[0] == {"id": "cat/00.png", "label": 0, "source": "chunk-00000"}
    assert rows[-1]["id"] == "dog/11.png" and rows[-1]["label"] == 1
    assert json.loads((tmp_path / "emb" / "00002.done.json").read_text())["skipped"] == 1


def test_shards_and_rows_follow_the_data_order(reference, shards):
    meta = json.loads((shards / "dataset.json").read_text())["splits"]["train"]["shards"]
    parts = list(E.iter_embedding_shards(reference))
    assert [n for n, _, _ in parts] == ["00000", "00001", "00002"]
    assert [json.loads((reference / f"{n}.done.json").read_text())["source"] for n, _, _ in parts] == meta
    for (_, x, rows), shard in zip(parts, meta):
        want = [(s.key.split(":", 1)[1], s.label, shard) for s in iter_shard(shards / shard)]
        assert [(r["id"], r["label"], r["source"]) for r in rows] == want and len(x) == 300


# ------------------------------------------------------------------------------------------------- resume
def test_resume_skips_finished_shards_and_redoes_a_cut_short_one(export, shards, reference, tmp_path, caplog):
    out = tmp_path / "emb"
    run_cli("embed", "--model", export, "--data", str(shards), "--out", str(out), "--workers", "0", "--no-progress")
    # shard 00001 cut short: its .npy written, the process killed before the done file; a temp file left behind
    (out / "00001.done.json").unlink()
    (out / ".00001.jsonl.0badc0de.tmp").write_text("half")
    before = {n: stats(out, n) for n in ("00000", "00002")}
    assert E.finished_shards(out) == ["00000", "00002"]
    time.sleep(0.01)
    caplog.clear()
    res = run_cli("embed", "--model", export, "--data", str(shards), "--out", str(out), "--workers", "0",
                  "--no-progress")
    assert (res["shards_skipped"], res["shards_done"], res["images"], res["embeddings"]) == (2, 1, 300, 900)
    assert "2 of 3 shards already finished: skipped" in caplog.text
    assert {n: stats(out, n) for n in ("00000", "00002")} == before  # untouched
    assert not list(out.glob(".*.tmp"))
    assert_same_embeddings(out, reference)


def test_resume_after_sigkill(export, shards, reference, tmp_path):
    """A real crash: the CLI killed (SIGKILL, decoding workers too) once its first shard is done."""
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "sslhub", "embed", "--model", export, "--data", str(shards), "--out", str(out),
           "--batch-size", "8", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "00000.done.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert E.finished_shards(out) == ["00000"], "killed too late to test anything"
    first = stats(out, "00000")
    with pytest.raises(E.UnfinishedEmbeddingsError):
        load_all(out)
    res = run_cli("embed", "--model", export, "--data", str(shards), "--out", str(out), "--workers", "0",
                  "--no-progress")
    assert (res["shards_skipped"], res["shards_done"]) == (1, 2)
    assert stats(out, "00000") == first
    assert_same_embeddings(out, reference)


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.slow
def test_two_processes_equal_one_and_split_the_shards(export, shards, reference, tmp_path):
    out = tmp_path / "emb"
    r = subprocess.run([*TORCHRUN, "-m", "sslhub", "embed", "--model", export, "--data", str(shards), "--out",
                        str(out), "--workers", "1", "--no-progress"], env=ENV, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 prints the job's summary
    s = summaries[0]
    assert (s["processes"], s["images"], s["shards_done"], s["embeddings"]) == (2, 900, 3, 900)
    ranks = {n: json.loads((out / f"{n}.done.json").read_text())["rank"] for n in ("00000", "00001", "00002")}
    assert ranks == {"00000": 0, "00001": 1, "00002": 0}
    assert_same_embeddings(out, reference)


# ----------------------------------------------------------------------------------------------- bad input
def cli_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli_main(list(args)) == 2
    return capsys.readouterr().err


def test_a_folder_of_other_embeddings_is_refused_until_overwrite(export, reference, shards, tmp_path, capsys):
    out = tmp_path / "emb"
    shutil.copytree(reference, out)
    before = stats(out, "00000")
    for extra, field in ((["--dtype", "float32"], "dtype"), (["--no-normalize"], "normalized"),
                         (["--model", str(shutil.copytree(export, tmp_path / "export2"))], "model")):
        args = ["--model", export, "--data", str(shards), "--out", str(out), *extra]
        err = cli_error(capsys, "embed", *args)
        assert f"written for another {field}" in err and "--overwrite" in err and str(out) in err, err
    err = cli_error(capsys, "embed", "--model", export, "--data", str(SAMPLE), "--out", str(out))
    assert "another data" in err
    with pytest.raises(EmbeddingsError, match="another split .'train', this run: 'test'"):
        check_manifest(out, {**E.read_manifest(out), "split": "test"})
    assert stats(out, "00000") == before and E.finished_shards(out) == ["00000", "00001", "00002"]
    res = run_cli("embed", "--model", export, "--data", str(shards), "--out", str(out), "--dtype", "float32",
                  "--workers", "0", "--overwrite", "--no-progress")
    assert res["images"] == 900 and res["shards_skipped"] == 0 and E.read_manifest(out)["dtype"] == "float32"
    x, _ = load_all(out)
    y, _ = load_all(reference)
    assert x.dtype == np.float32 and np.abs(x - y).max() < FP16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    err = cli_error(capsys, "embed", "--model", export, "--data", str(SAMPLE), "--out", str(tmp_path / "other"),
                    "--overwrite")
    assert "not an embeddings folder" in err and (tmp_path / "other" / "notes.txt").exists()


def test_missing_data_is_an_error_before_anything_is_written(export, tmp_path, capsys):
    err = cli_error(capsys, "embed", "--model", export, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert "nope" in err and "not found" in err and not (tmp_path / "e").exists()
    err = cli_error(capsys, "embed", "--model", export, "--data", str(tmp_path / "train-{00000..00001}.tar"),
                    "--out", str(tmp_path / "e"))
    assert "train-00000.tar" in err and not (tmp_path / "e").exists()


def write_folder(folder: Path, sizes: list[int], dim: int = 4) -> list[np.ndarray]:
    E.write_manifest(folder, {"model": "m", "data": "d", "split": "train", "dim": dim, "dtype": "float32",
                              "normalized": False, "shards": [E.shard_name(i) for i in range(len(sizes))]})
    arrays = []
    for i, n in enumerate(sizes):
        a = np.arange(n * dim, dtype=np.float32).reshape(n, dim) + 1000 * i
        E.write_embedding_shard(folder, E.shard_name(i), a, [{"id": f"{i}-{j}", "label": -1, "source": f"s{i}"}
                                                               for j in range(n)])
        arrays.append(a)
    return arrays


def test_reading_in_manifest_order_and_unfinished_shards(tmp_path):
    arrays = write_folder(tmp_path, [3, 2, 4])
    got = list(E.iter_embedding_shards(tmp_path))
    assert [n for n, _, _ in got] == ["00000", "00001", "00002"]
    assert all(np.array_equal(a, b) and isinstance(a, np.memmap) and not a.flags.writeable
               for (_, a, _), b in zip(got, arrays))
    assert got[1][2][1] == {"id": "1-1", "label": -1, "source": "s1"}
    assert E.count_embeddings(tmp_path) == 9
    done = json.loads((tmp_path / "00001.done.json").read_text())
    assert done["count"] == 2 and done["source"] == "s1" and len(done["sha256"]) == 64
    # a cut-short .npy (the done file says 2 rows, the file holds fewer bytes) and a missing done file
    npy = tmp_path / "00001.npy"
    npy.write_bytes(npy.read_bytes()[:-4])
    (tmp_path / "00002.done.json").unlink()
    assert E.finished_shards(tmp_path) == ["00000"]
    with pytest.raises(E.UnfinishedEmbeddingsError) as e:
        list(E.iter_embedding_shards(tmp_path))
    assert str(tmp_path) in str(e.value) and "00001, 00002" in str(e.value) and "2 of 3" in str(e.value)
    assert isinstance(e.value, E.EmbeddingsError) and isinstance(e.value, ValueError)
    with pytest.raises(E.UnfinishedEmbeddingsError):
        E.count_embeddings(tmp_path)
    assert [n for n, _, _ in E.iter_embedding_shards(tmp_path, allow_partial=True)] == ["00000"]
    assert E.count_embeddings(tmp_path, allow_partial=True) == 3


def test_a_missing_or_foreign_manifest_is_clear(tmp_path):
    with pytest.raises(E.EmbeddingsError, match="not an embeddings folder.*sslhub embed"):
        E.read_manifest(tmp_path)
    (tmp_path / E.MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(E.EmbeddingsError, match="not an sslhub embeddings manifest"):
        list(E.iter_embedding_shards(tmp_path))
    with pytest.raises(E.EmbeddingsError, match="rows"):
        E.write_embedding_shard(tmp_path, "00000", np.zeros((2, 3)), [{"id": "a"}])
