"""The on-disk index (sslhub.inference.ondisk): built shard by shard from an embeddings folder, its lists
merged into one memory-mapped file, served by load_index / search_meta / `sslhub index search` unchanged.

Vectors are real-derived: pixel PCA (D = 64) of the bundled CIFAR-10 sample, 10 noisy copies of each of
the 1,000 train images in 4 shards (float16, as `sslhub embed` writes them); queries are the 500 test
images (never stored). Exact neighbours come from a numpy brute force written here.

FAISS runs on one OpenMP thread here (the suite shares busy cores) and the index is built once per module;
small nlist and PQ keep every build to seconds.
"""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE
from PIL import Image

from sslhub.apps.cli import main
from sslhub.data.images import decode_all
from sslhub.data.sources import open_source
from sslhub.errors import InputError
from sslhub.inference import ondisk
from sslhub.inference.embeddings import EmbeddingsError, UnfinishedEmbeddingsError, write_embedding_shard, write_manifest
from sslhub.inference.ondisk import build_from_embeddings, plan
from sslhub.inference.retrieval import IndexFileError, load_index

SHARDS, PER_SHARD, COPIES = 4, 2500, 10
faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def pca64():
    return pixel_pca(64)


def pixel_pca(dim: int) -> tuple[np.ndarray, np.ndarray]:
    tr, te = (decode_all(open_source(SAMPLE, s), 32, progress=False).images.float().flatten(1) / 255
              for s in ("train", "test"))
    mu = tr.mean(0)
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(tr - mu, q=dim, center=False)
    return tuple(F.normalize((x - mu) @ v, dim=1).numpy() for x in (tr, te))


def write_embeddings(folder, base: np.ndarray, shards: int, per_shard: int, model: str = "pixel-pca",
                     noise: float = 0.3) -> np.ndarray:
    """Noisy copies of ``base`` as an embeddings folder; returns all stored vectors (float32 of the float16)."""
    rng = np.random.default_rng(0)
    names = [f"{i:05d}" for i in range(shards)]
    write_manifest(folder, {"model": model, "data": "cifar10-sample", "split": "train", "dim": base.shape[1],
                            "dtype": "float16", "normalized": True, "shards": names})
    out = []
    for s, name in enumerate(names):
        rows = np.arange(s * per_shard, (s + 1) * per_shard)
        x = base[rows % len(base)] + noise / np.sqrt(base.shape[1]) * rng.standard_normal((per_shard, base.shape[1]))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        write_embedding_shard(folder, name, x, [{"id": f"r{r}", "label": int(r % 10), "source": name}
                                                for r in rows.tolist()])
        out.append(x.astype(np.float32))
    return np.concatenate(out)


def exact_top(q: np.ndarray, x: np.ndarray, k: int = 10) -> np.ndarray:
    s = q @ x.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def built(tmp_path_factory, pca64):
    """(index folder, embeddings folder, stored vectors (N, 64), held-out queries (400, 64))."""
    train, test = pca64
    root = tmp_path_factory.mktemp("ondisk")
    x = write_embeddings(root / "emb", train, SHARDS, PER_SHARD)
    build_from_embeddings(root / "emb", root / "index", kind="ondisk", nlist=32, pq_m=16, opq=False,
                          calibration_queries=test[:100], progress=False)
    return root / "index", root / "emb", x, test[100:]


def recall_of(index, q: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray, list[list[int]]]:
    scores, ids = index.search(q, k=10)
    rows = [[int(i[1:]) for i in row] for row in ids]  # ids "r<row>"
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(rows, exact_top(q, x).tolist())])), scores, rows


def test_recall_against_exact_search(built):
    path, _, x, q = built
    index = load_index(path)
    assert index.kind == "ivfpq" and index.info["layout"] == "ondisk" and len(index) == SHARDS * PER_SHARD
    assert index.info["shards"] == SHARDS and index.info["calibration"]["queries"] == "100 given"
    assert index.info["refine"] == ondisk.REFINE and index.refine == ondisk.REFINE  # re-ranked by default
    recall, scores, rows = recall_of(index, q, x)
    assert recall >= 0.9, recall
    # re-ranked: the scores are the exact inner products of the stored (float16) vectors, best first
    true = np.take_along_axis(q @ x.T, np.array(rows), 1)
    np.testing.assert_allclose(scores, true, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_reranking_raises_recall_and_ranks_an_exact_copy_first(built):
    """PQ codes alone cannot order near-duplicates (10 noisy copies per image); exact re-ranking can."""
    path, _, x, q = built
    index = load_index(path)
    refined = recall_of(index, q, x)[0]
    picks = np.random.default_rng(2).choice(len(x), 40, replace=False)
    first = [h[0]["id"] for h in index.search_meta(x[picks], k=5)]
    assert first == [f"r{r}" for r in picks.tolist()]  # each stored vector's own row first, every time
    index.refine = 0  # codes only
    codes = recall_of(index, q, x)[0]
    codes_first = sum(h[0]["id"] == f"r{r}" for h, r in zip(index.search_meta(x[picks], k=5), picks.tolist()))
    assert refined >= codes + 0.15, (refined, codes)
    assert codes_first < 40


def test_without_the_embeddings_it_falls_back_to_codes(built, tmp_path, caplog):
    path, emb, x, q = built
    shutil.copytree(emb, tmp_path / "emb")
    shutil.copytree(path, tmp_path / "index")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["vectors"]["embeddings"] == str(emb.resolve()) and len(meta["vectors"]["shards"]) == SHARDS
    assert all(s["sha256"] == json.loads((emb / f"{s['name']}.done.json").read_text())["sha256"]
               for s in meta["vectors"]["shards"])
    vectors = load_index(path).vectors
    assert all(isinstance(a, np.memmap) for a in vectors.arrays)  # read from the shards, not copied
    rows = np.array([PER_SHARD * 3 + 7, 9, 5, PER_SHARD * 3 + 2, 9])  # any order, repeats, across shards
    np.testing.assert_array_equal(vectors.get(rows), x[rows])
    meta["vectors"]["embeddings"] = str(tmp_path / "gone")
    (tmp_path / "index" / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING"):
        index = load_index(tmp_path / "index")
    assert index.refine == 0 and index.vectors is None and "compressed codes alone" in caplog.text
    assert len(index.search(q[:3], k=10)[1][0]) == 10
    meta["vectors"]["embeddings"] = str(tmp_path / "emb")  # a copy with one shard rewritten: refused, too
    (tmp_path / "index" / "meta.json").write_text(json.dumps(meta))
    done = json.loads((tmp_path / "emb" / "00001.done.json").read_text())
    (tmp_path / "emb" / "00001.done.json").write_text(json.dumps(dict(done, sha256="0" * 64)))
    assert load_index(tmp_path / "index").vectors is None


def test_an_exact_copy_finds_its_row_and_metadata(built):
    path, _, x, _ = built
    index = load_index(path)
    picks = np.random.default_rng(1).choice(len(x), 40, replace=False)
    hits = index.search_meta(x[picks], k=10)
    found = 0
    for r, row in zip(picks.tolist(), hits):
        by_id = {h["id"]: h for h in row}
        if f"r{r}" in by_id:
            found += 1
            h = by_id[f"r{r}"]
            assert h == {"id": f"r{r}", "score": h["score"], "key": f"r{r}", "label": r % 10,
                         "source": f"{r // PER_SHARD:05d}"}
    assert found >= 38, found  # rows in every shard: an id offset between blocks would miss them
    assert index.ids[PER_SHARD + 3] == f"r{PER_SHARD + 3}" and index.metadata[-1]["label"] == (len(x) - 1) % 10


def test_lists_are_memory_mapped_from_the_index_folder(built):
    path, _, _, _ = built
    index = load_index(path)
    ivf = faiss.extract_index_ivf(index.faiss)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert lists.filename == str(path / "index.ivfdata") and lists.read_only
    assert index.metadata.__class__.__name__ == "_Field"  # rows read on demand, not a list in RAM
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["layout"] == "ondisk" and meta["ids"] is None
    assert set(meta["files"]) == {"index.faiss", "index.ivfdata", "metadata.jsonl", "offsets.npy"}
    assert not list(path.glob(".blocks*"))  # the per-shard blocks are gone
    with pytest.raises(InputError, match="copy its folder"):
        index.save(path.parent / "copy")


def test_cosine_normalises_the_stored_and_query_vectors(pca64, tmp_path):
    """metric='cosine' on vectors of uneven norms: the codes and the re-ranking both use unit vectors."""
    train, test = pca64
    x = write_embeddings(tmp_path / "emb", train, 2, 1000)
    scale = np.random.default_rng(3).uniform(0.2, 5, (2000, 1)).astype(np.float32)
    for s in ("00000", "00001"):  # rewrite the shards with uneven norms (the done files follow)
        rows = [json.loads(r) for r in (tmp_path / "emb" / f"{s}.jsonl").read_text().splitlines()]
        sl = slice(0, 1000) if s == "00000" else slice(1000, 2000)
        write_embedding_shard(tmp_path / "emb", s, (x[sl] * scale[sl]).astype(np.float16), rows)
    index = build_from_embeddings(tmp_path / "emb", tmp_path / "index", kind="ondisk", metric="cosine", nlist=16,
                                  pq_m=16, opq=False, calibration_queries=test[:50], progress=False)
    q = test[50:150] * 3.0
    scores, ids = index.search(q, k=10)
    stored = (x * scale).astype(np.float16).astype(np.float32)
    exact = exact_top(q, stored / np.linalg.norm(stored, axis=1, keepdims=True))
    rows = [[int(i[1:]) for i in row] for row in ids]
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(rows, exact.tolist())]) >= 0.9
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)  # re-ranked by cosines, not raw products
    cos = np.take_along_axis((q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T, np.array(rows), 1)
    np.testing.assert_allclose(scores, cos, atol=1e-4)


def test_cli_build_and_search(open_clip_folder, tmp_path, capsys):
    """`sslhub index build --embeddings` then `sslhub index search` with the model the embeddings record."""
    train, _ = pixel_pca(32)  # the tiny CLIP embeds 32-d
    rotation = np.linalg.qr(np.random.default_rng(4).standard_normal((32, 32)))[0].astype(np.float32)
    # rotated: even variance across PQ sub-vectors, so the variance rule skips OPQ training (seconds here)
    write_embeddings(tmp_path / "emb", train @ rotation, 2, 1000, model=str(open_clip_folder[0]))
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "index"),
                 "--kind", "ondisk"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["layout"] == "ondisk" and res["vectors"] == 2000 and res["kind"] == "ivfpq"
    assert load_index(tmp_path / "index").info["opq"] is False
    img = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    assert main(["index", "search", "--index", str(tmp_path / "index"), "--image", str(img), "--k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["hits"]
    assert len(hits) == 3 and {"id", "score", "key", "label", "source"} <= set(hits[0])
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"] and hits[0]["id"].startswith("r")
    # --embeddings with --model/--data is refused, clearly
    assert main(["index", "build", "--embeddings", str(tmp_path / "emb"), "--model", "m", "--data", "d",
                 "--out", str(tmp_path / "x")]) == 2
    assert "either --embeddings" in capsys.readouterr().err
    assert main(["index", "build", "--out", str(tmp_path / "x")]) == 2
    assert "needs --embeddings" in capsys.readouterr().err


def test_small_sets_keep_the_in_ram_choice(tmp_path):
    base = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    x = write_embeddings(tmp_path / "emb", base / np.linalg.norm(base, axis=1, keepdims=True), 2, 400)
    index = build_from_embeddings(tmp_path / "emb", tmp_path / "index", progress=False)
    assert index.kind == "flat" and index.info["layout"] == "ram"
    hit = load_index(tmp_path / "index").search_meta(x[437], k=1)[0][0]
    assert hit == {"id": "r437", "score": pytest.approx(1.0, abs=1e-3), "key": "r437", "label": 7, "source": "00001"}


def test_the_choice_rule():
    small = plan(100_000, 256, 4096)
    assert small["layout"] == "ram"
    big = plan(10_000_000, 256, 2048)
    assert big["layout"] == "ondisk" and big["nlist"] == ondisk.NLIST_MAX and big["pq_m"] == 32
    assert plan(10_000_000, 256, 4096)["pq_m"] == 64  # a larger budget buys larger codes
    assert plan(300_000, 256, 2048, kind="ondisk")["nlist"] == 2048 // 1  # 4·√N = 2191 → 2048
    with pytest.raises(InputError, match="builds in RAM"):
        plan(10_000_000, 256, 2048, kind="hnsw")
    uneven = np.random.default_rng(0).standard_normal((2000, 64)) * np.linspace(3, 0.1, 64)
    assert ondisk.use_opq(uneven, 16)[0] and not ondisk.use_opq(np.random.default_rng(0).standard_normal((2000, 64)), 16)[0]


def test_failed_build_leaves_the_previous_index(built, tmp_path, monkeypatch):
    path, emb, _, _ = built
    shutil.copytree(path, tmp_path / "index")
    before = {f.name: f.read_bytes() for f in (tmp_path / "index").iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ondisk, "merge_ondisk", boom)
    for out in (tmp_path / "index", tmp_path / "new"):
        with pytest.raises(RuntimeError, match="disk full"):
            build_from_embeddings(emb, out, kind="ondisk", nlist=16, pq_m=8, opq=False, progress=False)
    assert {f.name: f.read_bytes() for f in (tmp_path / "index").iterdir()} == before
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    load_index(tmp_path / "index")


def test_clear_errors(built, tmp_path):
    path, emb, _, q = built
    with pytest.raises(EmbeddingsError, match="no embeddings folder"):
        build_from_embeddings(tmp_path / "nowhere", tmp_path / "i")
    shutil.copytree(emb, tmp_path / "emb")
    (tmp_path / "emb" / "00002.done.json").unlink()  # a shard the embedding job has not finished
    with pytest.raises(UnfinishedEmbeddingsError, match="00002"):
        build_from_embeddings(tmp_path / "emb", tmp_path / "i", kind="ondisk")
    with pytest.raises(InputError, match="dimension 32 but .* 64-d"):
        build_from_embeddings(emb, tmp_path / "i", kind="ondisk", calibration_queries=np.ones((5, 32), np.float32))
    assert not (tmp_path / "i").exists()
    with pytest.raises(InputError, match="dimension 32 but the index holds 64-d"):
        load_index(path).search(np.ones((1, 32), np.float32))
    shutil.copytree(path, tmp_path / "cut")
    with open(tmp_path / "cut" / "index.ivfdata", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IndexFileError, match="index.ivfdata: is 1000 bytes"):
        load_index(tmp_path / "cut")
