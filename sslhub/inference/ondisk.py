"""Build an index from an embeddings folder (``sslhub embed``), on disk when the vectors exceed RAM.

    build_from_embeddings("runs/emb", "runs/index", memory_budget_mb=4096)   # → Index, saved at runs/index

The choice (``kind="auto"``), by the float32 size of the vectors F = N·D·4 and ``memory_budget_mb`` B:
- 2·F ≤ B: today's in-RAM ``build_index`` (flat / HNSW / IVF; it holds the matrix and the index's copy);
- else an IVF-PQ index whose inverted lists live in one memory-mapped file (``kind="ondisk"`` forces it):
  * nlist = 4·√N rounded down to a power of two (the low end of the FAISS guideline's 4–16·√N [3]),
    at most NLIST_MAX = 2,048 (k-means and the assignment of every vector cost N·nlist·D: 10M vectors take
    ~10 min on 2 cores at 2,048 lists; ``nlist=`` buys faster searches with a longer build), and fewer when
    B/4 cannot hold 39 training vectors per list;
  * PQ bytes m: the largest of 64, 48, 32, … (each sub-vector ≥ 4 dims) whose lists N·(m + 8) fit in B/4:
    the merge maps the blocks and the merged file at once, and at search time the page cache should hold
    the lists;
  * OPQ (a D×D rotation learned before PQ [4]) when the training sample's variance is uneven across the m
    sub-vectors (largest / smallest sub-vector variance > OPQ_RATIO): PQ gives each sub-vector 256
    centroids, wasted on low-variance ones (e.g. PCA-ordered dims); the FAISS guideline [3] lists
    "OPQM_D,…,PQM" for this, with the rotation's cost (a D×D product per query) as its price.
  Steps: coarse quantizer, OPQ and PQ trained on a seeded sample of rows drawn across all shards
  (≤ 64 per list, ≤ B/4 bytes); each embedding shard added into a copy of the trained empty index with its
  global row numbers as ids and written as a block; the blocks' lists merged on disk
  (``faiss.contrib.ondisk.merge_ondisk``) into ``index.ivfdata``; ``nprobe`` calibrated as in
  ``retrieval._calibrate`` with exact neighbours streamed over the shards during the fill. No step holds
  more than the sample, one chunk of ADD_CHUNK vectors and one shard's codes and rows.

Searches re-rank (``refine``, default REFINE = 10; FAISS's IndexRefineFlat idea, from disk): the PQ codes
give k·refine candidates, whose float vectors are read from the embeddings folder's shards (memory-mapped,
``sslhub.inference.rows.ShardVectors``; the vectors stay where ``sslhub embed`` wrote them) and scored
exactly. PQ codes alone cannot order near-duplicates (noisy copies of one image differ by less than the
quantisation error), so without it recall@10 stays low and a stored vector is often not its own first hit.
meta.json records the folder's absolute path and each shard's sha256 (from its done file); when the folder
is gone or a shard changed, ``load_index`` warns and the index ranks by its codes alone. nprobe is
calibrated for the re-ranked search. The build trains PQ without polysemous training (the index factory's
default, minutes of annealing for a search mode not used here; it was most of the old build time).

The folder (``retrieval.load_index`` reads it; ``Index.search_meta`` returns the rows as for an in-RAM
index): ``index.faiss`` (trained index, lists by reference), ``index.ivfdata`` (the lists, opened
memory-mapped, read-only), ``metadata.jsonl`` + ``offsets.npy`` (row i's ``{"id", ...}``, read by one seek:
``sslhub.inference.rows``) and ``meta.json`` (format version 2, ``layout: "ondisk"``, sizes and sha256 of
every file). Written aside and swapped in (``sslhub.atomic.replace_folder``).

- [3] FAISS wiki, "Guidelines to choose an index"; "Indexes that do not fit in RAM" (merge_ondisk)
- [4] Ge, He, Ke, Sun. Optimized product quantization. TPAMI 2014
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sslhub import formats
from sslhub.atomic import replace_folder
from sslhub.errors import InputError
from sslhub.inference.embeddings import (EmbeddingsError, count_embeddings, iter_embedding_shards, read_manifest,
                                         shard_status)
from sslhub.inference.retrieval import (ADD_CHUNK, CALIB_K, CALIB_QUERIES, METRICS, MIN_PER_LIST, TRAIN_PER_LIST,
                                        Index, _as_matrix, _calibrate, _normalise, _pq_m, _sha256, build_index, faiss,
                                        load_index)
from sslhub.inference.rows import RowWriter, ShardVectors, split_row

log = logging.getLogger("sslhub.inference.ondisk")

DEFAULT_BUDGET_MB = 4096
IN_RAM_FACTOR = 2  # the in-RAM build holds the float32 matrix and the index's own copy of it
BUDGET_SHARE = 0.25  # of the budget: the training sample; the inverted lists
NLIST_MAX = 2048  # on 2 cores, assigning 10M 256-d vectors to 2,048 lists takes ~10 min; nlist= for more
OPQ_RATIO = 2.0  # OPQ when the largest sub-vector variance exceeds the smallest by this factor
OPQ_NITER, OPQ_TRAIN = 10, 16_384  # FAISS defaults 50 and 65,536: minutes per iteration on 2 busy cores
FORMAT_VERSION = 2  # meta.json of an on-disk index; an sslhub that reads only version 1 says "upgrade"
IVFDATA, OFFSETS = "index.ivfdata", "offsets.npy"
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq", "ondisk")
REFINE = 10  # a search re-ranks k·REFINE PQ candidates by exact scores (FAISS's IndexRefineFlat, from disk)


def plan(n: int, dim: int, memory_budget_mb: float, kind: str = "auto", nlist: int | None = None,
         pq_m: int | None = None) -> dict[str, Any]:
    """What to build for ``n`` × ``dim`` vectors under the budget: ``{"layout", "kind", "reason", ...}``."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    if memory_budget_mb is None or memory_budget_mb <= 0:
        raise InputError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    budget, flat = memory_budget_mb * 2**20, n * dim * 4
    fits = IN_RAM_FACTOR * flat <= budget
    why = f"float32 vectors {flat / 2**20:.0f} MB, ×{IN_RAM_FACTOR} {'≤' if fits else '>'} budget {memory_budget_mb:g} MB"
    if kind != "ondisk" and (kind != "auto" or fits):
        if not fits:
            raise InputError(f"kind={kind!r} builds in RAM but {why}: raise --memory-budget-mb or use --kind auto/ondisk")
        return {"layout": "ram", "kind": kind, "reason": why + ": built in RAM"}
    if n < 256:
        raise InputError(f"an on-disk IVF-PQ index needs at least 256 vectors to train, got {n}: use kind='flat'")
    share = budget * BUDGET_SHARE
    max_train = int(share // (dim * 4))
    if nlist is None:
        nlist = min(NLIST_MAX, 2 ** int(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(max(1, n / MIN_PER_LIST))))
        while nlist > 1 and MIN_PER_LIST * nlist > max_train:
            nlist //= 2
    if MIN_PER_LIST * nlist > min(n, max_train):
        raise InputError(f"nlist={nlist} needs {MIN_PER_LIST * nlist} training vectors but {n} rows / a "
                         f"{memory_budget_mb:g} MB budget allow {min(n, max_train)}: lower nlist or raise the budget")
    if pq_m is None:
        try:
            pq_m = _pq_m(dim, n, share)
        except InputError:  # even the smallest codes exceed the share: searches will read the lists from disk
            pq_m = min(m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and (dim // m >= 4 or m == 1))
            log.warning("even %d-byte PQ codes of %d vectors exceed a quarter of the budget: searches will read "
                        "the lists from disk", pq_m, n)
    if dim % pq_m:
        raise InputError(f"pq_m={pq_m} must divide the dimension {dim}")
    return {"layout": "ondisk", "kind": "ivfpq", "nlist": nlist, "pq_m": pq_m, "pq_bits": 8,
            "train_size": min(n, TRAIN_PER_LIST * nlist, max_train),
            "lists_mb": round(n * (pq_m + 8) / 2**20, 1),
            "reason": why + (": on disk" if kind == "auto" else ": kind='ondisk'")
            + f"; nlist {nlist} ≈ 4·√N (power of two), PQ {pq_m} bytes (lists fit a quarter of the budget)"}


def use_opq(sample: np.ndarray, m: int) -> tuple[bool, float]:
    """OPQ pays when the sample's variance is uneven across the m PQ sub-vectors: (decision, max/min ratio)."""
    var = sample.var(axis=0).reshape(m, -1).sum(1)  # (m,) variance per contiguous sub-vector
    ratio = float(var.max() / max(var.min(), 1e-12))
    return ratio > OPQ_RATIO, ratio


def _shards(folder: Path) -> tuple[dict, list[str], np.ndarray, list[dict]]:
    """Manifest, shard names, their row counts and ``{"name", "count", "sha256"}`` (from the done files);
    every shard must be finished."""
    manifest = read_manifest(folder)
    total = count_embeddings(folder)  # raises UnfinishedEmbeddingsError, naming the shards, before any work
    names = list(manifest["shards"])
    done = [shard_status(folder, s, manifest) for s in names]
    counts = np.array([int(d["count"]) for d in done], dtype=np.int64)
    if total == 0:
        raise EmbeddingsError(f"{folder} holds no embeddings: rerun `sslhub embed` on a non-empty data set")
    return manifest, names, counts, [{"name": s, "count": int(d["count"]), "sha256": d.get("sha256")}
                                     for s, d in zip(names, done)]


def _gather(folder: Path, names: list[str], counts: np.ndarray, rows: np.ndarray, progress: bool) -> np.ndarray:
    """Rows ``rows`` (sorted global numbers) from the memory-mapped shards → ``(len(rows), D)`` float32."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    parts = []
    for i in tqdm(range(len(names)), desc="sampling rows", unit="shard", disable=not progress):
        local = rows[(rows >= starts[i]) & (rows < starts[i + 1])] - starts[i]
        if len(local):
            parts.append(np.asarray(np.load(folder / f"{names[i]}.npy", mmap_mode="r")[local], dtype=np.float32))
    return np.concatenate(parts)


def _topk_merge(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int, larger: bool):
    """Merge two (scores (Q, k), rows (Q, k)) results into the best k per query."""
    d, i = np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1)
    order = np.argsort(-d if larger else d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def build_from_embeddings(folder: str | Path, out: str | Path, *, memory_budget_mb: float = DEFAULT_BUDGET_MB,
                          kind: str = "auto", metric: str = "ip", nlist: int | None = None, pq_m: int | None = None,
                          opq: bool | None = None, nprobe: int | None = None, calibration_queries: Any = None,
                          refine: int = REFINE, threads: int | None = None, seed: int = 0,
                          progress: bool = True) -> Index:
    """Index the embeddings folder ``folder`` and save it at ``out`` (see the module docstring); → the index,
    loaded from ``out`` (an on-disk one memory-mapped). ``opq`` None: by the variance rule. ``refine``: an
    on-disk search takes k·refine candidates by the PQ codes and re-ranks them by exact scores against the
    vectors in ``folder`` (≤ 1: codes only). ``threads``: FAISS's OpenMP threads (None: leave as set)."""
    folder, out = Path(folder).resolve(), Path(out)
    if threads:
        faiss.omp_set_num_threads(int(threads))
    if metric not in METRICS:
        raise InputError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    if not folder.is_dir():
        raise EmbeddingsError(f"{folder}: no embeddings folder here (write one with `sslhub embed --out {folder}`)")
    manifest, names, counts, records = _shards(folder)
    n, dim = int(counts.sum()), int(manifest["dim"])
    choice = plan(n, dim, memory_budget_mb, kind, nlist, pq_m)
    log.info("index of %d × %d embeddings from %s: %s", n, dim, folder, choice["reason"])
    if metric == "ip" and not manifest["normalized"]:
        log.warning("%s: embeddings are not L2-normalised: inner product is not cosine similarity; "
                    "pass metric='cosine'", folder)
    source = {"embeddings": str(folder), "model": manifest["model"], "data": manifest["data"],
              "split": manifest["split"]}
    if choice["layout"] == "ram":
        x, ids, metadata = [], [], []
        for _, array, rows in iter_embedding_shards(folder, mmap=True):
            x.append(np.asarray(array, dtype=np.float32))
            for r in rows:
                i, md = split_row(r)
                ids.append(i)
                metadata.append(md)
        index = build_index(np.concatenate(x), ids=ids, metadata=metadata, kind=choice["kind"], metric=metric,
                            memory_budget_mb=memory_budget_mb, progress=progress, nlist=nlist, nprobe=nprobe,
                            calibration_queries=calibration_queries, seed=seed)
        index.info.update(source, layout="ram", choice=choice["reason"])
        index.save(out)
        return index
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / formats.INDEX_META).exists())):
        raise InputError(f"refusing to replace {out}: it is not an sslhub index folder (no meta.json)")
    if calibration_queries is not None:
        calibration_queries = _as_matrix(calibration_queries, "calibration_queries")
        if calibration_queries.shape[1] != dim:
            raise InputError(f"calibration_queries have dimension {calibration_queries.shape[1]} but {folder} "
                             f"holds {dim}-d embeddings: embed them with the same model")
    vectors = {"embeddings": str(folder), "dtype": manifest["dtype"], "shards": records}
    replace_folder(out, lambda tmp: _build_ondisk(tmp, folder, names, counts, dim, metric, choice, opq, nprobe,
                                                  calibration_queries, seed, progress, source, vectors, refine))
    return load_index(out)


def _build_ondisk(tmp: Path, folder: Path, names: list[str], counts: np.ndarray, dim: int, metric: str,
                  choice: dict, opq: bool | None, nprobe: int | None, queries: np.ndarray | None, seed: int,
                  progress: bool, source: dict, vectors: dict, refine: int) -> None:
    t0 = time.perf_counter()
    n, m, nlist = int(counts.sum()), choice["pq_m"], choice["nlist"]
    fmetric = getattr(faiss, METRICS[metric])
    prep = (lambda a: _normalise(a)) if metric == "cosine" else (lambda a: a)
    # 1. training sample (and, without held-out queries, the calibration rows), seeded, across all shards
    rng = np.random.default_rng(seed)
    own = None if queries is not None else np.sort(rng.choice(n, min(CALIB_QUERIES, n), replace=False))
    train_rows = np.sort(rng.choice(n, choice["train_size"], replace=False))
    sample = prep(_gather(folder, names, counts, train_rows, progress))
    if own is not None:
        queries = prep(_gather(folder, names, counts, own, False))
    elif metric == "cosine":
        queries = _normalise(queries)
    if opq is None:
        opq, ratio = use_opq(sample, m)
        opq_why = f"sub-vector variance max/min {ratio:.1f} {'>' if opq else '≤'} {OPQ_RATIO}"
    else:
        opq_why = "given"
    spec = (f"OPQ{m}_{dim}," if opq else "") + f"IVF{nlist},PQ{m}"
    log.info("on-disk index %s for %d vectors: OPQ %s (%s)", spec, n, "on" if opq else "off", opq_why)
    trained = faiss.index_factory(dim, spec, fmetric)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(trained))
    ivf.cp.seed = seed
    ivf.do_polysemous_training = False  # the factory's default: minutes of annealing for a search mode unused here
    ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = 10, 64  # as build_index's IVF-PQ
    if opq:
        rotation = faiss.downcast_VectorTransform(trained.chain.at(0))
        rotation.niter, rotation.max_train_points = OPQ_NITER, OPQ_TRAIN
    with tqdm(total=1, desc=f"training {spec} on {len(sample)} rows", disable=not progress) as bar:
        t = time.perf_counter()
        trained.train(sample)
        bar.update(1)
    train_s = time.perf_counter() - t
    del sample
    # 2. fill: each shard into a copy of the empty trained index, ids = global row numbers, one block each
    blocks_dir = tmp / ".blocks"
    blocks_dir.mkdir()
    blocks, start, k = [], 0, min(CALIB_K, n - 1) + 1
    larger = metric != "l2"
    exact = (np.full((len(queries), k), -np.inf if larger else np.inf, np.float32), np.full((len(queries), k), -1))
    t = time.perf_counter()
    with RowWriter(tmp / formats.INDEX_METADATA, tmp / OFFSETS, n) as writer, \
            tqdm(total=n, desc="filling blocks", unit="vec", disable=not progress) as bar:
        for (name, array, rows), expected in zip(iter_embedding_shards(folder, mmap=True), counts):
            if len(array) != expected or array.shape[1] != dim:
                raise EmbeddingsError(f"{folder / (name + '.npy')} is {array.shape}, expected ({expected}, {dim}): "
                                      "the folder changed during the build; rerun it")
            block = faiss.clone_index(trained)
            for i in range(0, len(array), ADD_CHUNK):
                x = prep(np.ascontiguousarray(array[i : i + ADD_CHUNK], dtype=np.float32))
                block.add_with_ids(x, np.arange(start + i, start + i + len(x), dtype=np.int64))
                d, r = faiss.knn(queries, x, min(k, len(x)), fmetric)
                exact = _topk_merge(exact, (d, r + start + i), k, larger)
                bar.update(len(x))
            for r in rows:
                writer.write(r)
            blocks.append(str(blocks_dir / f"{name}.faiss"))
            faiss.write_index(block, blocks[-1])
            del block, array, rows
            start += int(expected)
    fill_s = time.perf_counter() - t
    # 3. merge the blocks' lists into one on-disk file, next to the index file
    t = time.perf_counter()
    with tqdm(total=1, desc=f"merging {len(blocks)} blocks on disk", disable=not progress) as bar:
        index = faiss.clone_index(trained)
        merge_ondisk(index, blocks, str(tmp / IVFDATA))
        bar.update(1)
    merge_s = time.perf_counter() - t
    if index.ntotal != n:
        raise InputError(f"merged {index.ntotal} vectors for {n} embeddings")
    info = {"count": n, "dim": dim, "metric": metric, "flat_mb": round(n * dim * 4 / 2**20, 1), "kind": "ivfpq",
            "layout": "ondisk", "factory": spec, "opq": bool(opq), "opq_reason": opq_why, "nlist": nlist,
            "pq_m": m, "pq_bits": 8, "train_size": int(len(train_rows)), "reason": choice["reason"],
            "shards": len(names), **source}
    info["refine"] = int(refine) if refine and refine > 1 else 0
    out = Index(index, "ivfpq", metric, info, None, None)
    if info["refine"]:  # calibrate nprobe for the search as it will run: re-ranked
        out.vectors, out.refine = ShardVectors(folder, vectors["shards"]), info["refine"]
    out.nprobe = nprobe or _calibrate(out, None, queries, seed, own=own, exact=exact[1])
    shutil.rmtree(blocks_dir)
    faiss.write_index(index, str(tmp / formats.INDEX_FAISS))
    info["seconds"] = {"train": round(train_s, 1), "fill": round(fill_s, 1), "merge": round(merge_s, 1),
                       "total": round(time.perf_counter() - t0, 1)}
    files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
             for f in (formats.INDEX_FAISS, IVFDATA, formats.INDEX_METADATA, OFFSETS)}
    meta = {"format": "sslhub-index", "format_version": FORMAT_VERSION, "layout": "ondisk", "dim": dim,
            "kind": "ivfpq", "metric": metric, "count": n, "has_metadata": True, "info": info, "ids": None,
            "files": files, "index_bytes": files[formats.INDEX_FAISS]["bytes"],
            "index_sha256": files[formats.INDEX_FAISS]["sha256"], "vectors": vectors}
    (tmp / formats.INDEX_META).write_text(json.dumps(meta, ensure_ascii=False))
    log.info("built on-disk index: %s", json.dumps(info, ensure_ascii=False))


def merge_ondisk(index: Any, blocks: list[str], ivfdata: str) -> None:
    """``faiss.contrib.ondisk.merge_ondisk``: the blocks are opened memory-mapped, their ids kept (global rows)."""
    from faiss.contrib.ondisk import merge_ondisk as merge  # faiss is optional (the `retrieval` extra)

    merge(index, blocks, ivfdata)
