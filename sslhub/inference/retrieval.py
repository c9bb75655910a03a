"""FAISS retrieval over embeddings: build an index, search it, save/load it atomically, measure recall.

``build_index(embeddings (N, D))`` picks the index from the data (``kind="auto"``):
- fewer than 10,000 vectors: exact ``IndexFlatIP``;
- 10,000 to 2 million: HNSW (M = 32), its ``efSearch`` calibrated (below). At 1M × 256 real-structured
  vectors on 2 cores it answers ~15× the exact queries/s at recall@10 ≥ 0.95 (BENCHMARKS.md), where
  IVF-Flat reached only ~4× at that recall: IVF scans its probed lists without BLAS. Its build is the
  price: ~17 s at 100k, ~4 min at 1M;
- more (or when the graph would exceed ``memory_budget_mb``): IVF-Flat with ``nlist ≈ 4·sqrt(N)`` lists
  (a power of two, the low end of the FAISS guideline), k-means on 64·nlist vectors (guideline: 30–256
  per list);
- IVF-PQ when the float32 vectors (N·D·4 bytes) exceed ``memory_budget_mb``.
Calibration: ``nprobe`` (IVF, from ``max(8, nlist/64)``) or ``efSearch`` (HNSW, from 16) grows by ~√2
until recall@10 against exact search reaches 0.96 on ``calibration_queries`` (held-out queries) or
else 256 database rows, each leaving itself out (a fixed setting is not enough: 8 of 256 lists gave 0.88
for unseen CIFAR-10 images over 10k pixel-PCA embeddings). Rows track unseen queries on real data
(within 0.01 there) but overrate recall on near-duplicates (noisy copies: 1.00 vs 0.94).

A saved index is a folder: ``index.faiss`` (``faiss.write_index``), ``meta.json`` (format version, dim,
kind, metric, count, info, ids, size and sha256 of index.faiss) and ``metadata.jsonl`` (one JSON object
per row). It is written next to its destination and swapped in: readers see the old or the new index.

- [0] Johnson, Douze, Jégou. Billion-scale similarity search with GPUs. 2017, https://arxiv.org/abs/1702.08734
- [1] Jégou, Douze, Schmid. Product quantization for nearest neighbor search. TPAMI 2011 (IVF-PQ)
- [2] Malkov, Yashunin. HNSW graphs for approximate nearest neighbours. TPAMI 2018, https://arxiv.org/abs/1603.09320
- [3] FAISS wiki, "Guidelines to choose an index" (nlist, training sample sizes)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sslhub import formats
from sslhub.atomic import replace_folder
from sslhub.errors import InputError, SslhubError
from sslhub.inference.rows import JsonlRows, open_vectors

log = logging.getLogger("sslhub.inference.retrieval")

FORMAT_VERSION = 1
ONDISK_VERSION = 2  # an on-disk index (sslhub.inference.ondisk): lists in index.ivfdata, rows in metadata.jsonl
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
METRICS = {"ip": "METRIC_INNER_PRODUCT", "cosine": "METRIC_INNER_PRODUCT", "l2": "METRIC_L2"}  # faiss constants


class _Faiss:
    """``faiss``, imported on first use: the module imports without the ``retrieval`` extra (the
    pure-torch metrics live in ``sslhub.eval.metrics``); building or loading an index needs it."""

    def __getattr__(self, name: str):
        try:
            import faiss as module
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("FAISS indexes need faiss: pip install 'sslhub[retrieval]' (faiss-cpu)",
                                      name="faiss") from e
        globals()["faiss"] = module
        return getattr(module, name)


faiss: Any = _Faiss()
FLAT_BELOW = 10_000  # auto: exact search below this many vectors
TRAIN_PER_LIST = 64  # k-means sample per inverted list (FAISS guideline 30–256; 64 keeps 1M builds ~1 min)
MIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid
HNSW_M, HNSW_EF_SEARCH, HNSW_EF_MAX = 32, 128, 1024  # graph degree; default and largest calibrated search beam
HNSW_AUTO_MAX = 2_000_000  # auto: HNSW up to here (build ≈ 4 min per million 256-d vectors on 2 cores), IVF above
CALIB_QUERIES, CALIB_K, RECALL_TARGET = 256, 10, 0.96  # calibration: a margin over the 0.95 goal
CALIB_GROWTH = 1.41  # each calibration step widens the search by ~√2
ADD_CHUNK = 100_000  # vectors per add() call; a progress bar is shown above one chunk
ACTION = "Rebuild it with `sslhub index build` (or `build_index(...).save(path)`)."


class IndexFileError(SslhubError, ValueError):
    """A saved index folder is missing, truncated, corrupt or inconsistent."""


def _bad(file: Path, problem: str) -> IndexFileError:
    return IndexFileError(f"{file}: {problem}. {ACTION}")


def _as_matrix(x: Any, what: str) -> np.ndarray:
    """Array or tensor → contiguous float32 ``(N, D)``; one query vector ``(D,)`` becomes ``(1, D)``."""
    x = np.ascontiguousarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    x = x[None] if x.ndim == 1 and what == "queries" else x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{what} must be a non-empty (N, D) array, got shape {x.shape}")
    for i in range(0, x.shape[0], ADD_CHUNK):  # chunked: no (N, D) bool temporary
        bad = ~np.isfinite(x[i : i + ADD_CHUNK]).all(1)
        if bad.any():
            raise InputError(f"{what} row {i + int(bad.argmax())} has NaN or inf values: fix or drop those rows")
    return x


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:  # mean |found ∩ exact| / k over rows (Q, k)
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]))


class Index:
    """A FAISS index plus the ids and metadata of its rows. Build with ``build_index``, load with ``load_index``."""

    def __init__(self, index: "faiss.Index", kind: str, metric: str, info: dict, ids: list | None, metadata: list | None):
        self.faiss, self.kind, self.metric, self.info = index, kind, metric, info
        self.ids, self.metadata = ids, metadata  # ids None: the row numbers 0..N-1
        # on disk: k·refine candidates by the codes, re-ranked by exact scores against the float vectors
        # (``sslhub.inference.rows.ShardVectors``, memory-mapped); refine ≤ 1 or no vectors: the codes' order
        self.vectors, self.refine = None, 0

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, metric={self.metric!r}, count={len(self)}, dim={self.dim})"

    @property
    def dim(self) -> int:
        return int(self.faiss.d)

    @property
    def nprobe(self) -> int:
        """IVF lists visited per query: higher is slower and more exact (HNSW: ``index.faiss.hnsw.efSearch``)."""
        return int(self._ivf().nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        ivf = self._ivf()
        if not 1 <= int(value) <= ivf.nlist:
            raise InputError(f"nprobe must be in 1..nlist={ivf.nlist}, got {value}")
        ivf.nprobe = self.info["nprobe"] = int(value)

    def _ivf(self):
        if self.kind not in ("ivf", "ivfpq"):
            raise AttributeError(f"nprobe applies to IVF indexes; this one is {self.kind!r}")
        return faiss.extract_index_ivf(self.faiss)

    def _queries(self, queries: Any) -> np.ndarray:
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]} but the index holds {self.dim}-d vectors: "
                             "embed them with the encoder that built the index")
        return _normalise(q) if self.metric == "cosine" else q

    def _search_rows(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise InputError(f"k must be ≥ 1, got {k}")
        k = min(k, len(self))
        if self.vectors is None or self.refine <= 1:
            return self.faiss.search(q, k, params=params)  # (Q, k) scores, (Q, k) rows (-1: none)
        rows = self.faiss.search(q, min(len(self), k * self.refine), params=params)[1]  # (Q, k·refine) candidates
        return _rerank(q, rows, self.vectors, self.metric, k)

    def _id(self, row: int):
        return None if row < 0 else row if self.ids is None else self.ids[row]

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, list[list]]:
        """``queries (Q, D)`` → scores ``(Q, k)`` float32, best first, and ids ``Q × k`` (k capped at len).
        Scores are inner products (``ip``, ``cosine``) or squared L2 distances (``l2``); where an IVF
        search finds fewer than k vectors the id is None and the score ±inf."""
        scores, rows = self._search_rows(self._queries(queries), k)
        scores = np.where(rows < 0, np.float32(np.inf if self.metric == "l2" else -np.inf), scores)
        return scores.astype(np.float32), [[self._id(r) for r in row] for row in rows.tolist()]

    def search_meta(self, queries: Any, k: int = 10) -> list[list[dict]]:
        """Per query, the hits as ``{"id", "score", **metadata}`` dicts, best first."""
        scores, rows = self._search_rows(self._queries(queries), k)
        md = self.metadata if self.metadata is not None else [{}] * len(self)
        return [[{"id": self._id(r), "score": s, **md[r]} for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores.tolist(), rows.tolist())]

    def save(self, path: str | Path) -> Path:
        """Write the index folder ``path/`` atomically, replacing any index saved there before."""
        path = Path(path)
        if self.info.get("layout") == "ondisk":
            raise InputError("an on-disk index references its index.ivfdata: copy its folder instead of saving it")
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / formats.INDEX_META).exists())):
            raise InputError(f"refusing to replace {path}: it is not an sslhub index folder (no meta.json)")

        def build(tmp: Path) -> None:
            faiss.write_index(self.faiss, str(tmp / formats.INDEX_FAISS))
            with open(tmp / formats.INDEX_METADATA, "w") as f:
                for row in self.metadata if self.metadata is not None else ({} for _ in range(len(self))):
                    f.write(json.dumps(row) + "\n")
            meta = {"format": "sslhub-index", "format_version": FORMAT_VERSION, "dim": self.dim, "kind": self.kind,
                    "metric": self.metric, "count": len(self), "has_metadata": self.metadata is not None,
                    "info": self.info, "index_bytes": (tmp / formats.INDEX_FAISS).stat().st_size,
                    "index_sha256": _sha256(tmp / formats.INDEX_FAISS), "ids": self.ids}
            (tmp / formats.INDEX_META).write_text(json.dumps(meta))

        replace_folder(path, build)
        log.info("saved %s to %s", self, path)
        return path


def _rerank(q: np.ndarray, rows: np.ndarray, vectors, metric: str, k: int, chunk: int = 256):
    """Candidates ``rows (Q, C)`` (-1: none) re-scored exactly against ``vectors.get`` → the best k (scores, rows)."""
    larger, worst = metric != "l2", np.float32(-np.inf if metric != "l2" else np.inf)
    out_d, out_i = np.full((len(q), k), worst, np.float32), np.full((len(q), k), -1, np.int64)
    for s in range(0, len(q), chunk):  # bounds the gathered (chunk·C, D) floats
        r = rows[s : s + chunk]
        valid = r >= 0
        uniq, inv = np.unique(r[valid], return_inverse=True)
        x = vectors.get(uniq)  # (U, D) float32, read from the memory-mapped shards
        if metric == "cosine":
            x = _normalise(x)
        qi = np.nonzero(valid)[0] + s
        d = np.full(r.shape, worst, np.float32)
        d[valid] = (np.einsum("ij,ij->i", q[qi], x[inv]) if larger else ((q[qi] - x[inv]) ** 2).sum(1))
        order = np.argsort(-d if larger else d, axis=1, kind="stable")[:, :k]
        out_d[s : s + chunk], out_i[s : s + chunk] = np.take_along_axis(d, order, 1), np.take_along_axis(r, order, 1)
    return out_d, np.where(np.isfinite(out_d), out_i, -1)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_index(path: str | Path, verify: bool = True) -> Index:
    """Read an index folder written by ``Index.save``; ``verify`` checks index.faiss against its sha256."""
    path = Path(path)
    meta_file, index_file, md_file = path / formats.INDEX_META, path / formats.INDEX_FAISS, path / formats.INDEX_METADATA
    if not meta_file.is_file():
        if not path.is_dir():
            raise _bad(path, "no index folder here")
        raise _bad(meta_file, "missing (not a saved index, or its save was interrupted)")
    try:
        meta = json.loads(meta_file.read_text())
        count, dim, kind, metric = int(meta["count"]), int(meta["dim"]), meta["kind"], meta["metric"]
        version, info, ids = int(meta["format_version"]), dict(meta["info"]), meta["ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise _bad(meta_file, f"unreadable or incomplete ({type(e).__name__}: {e})") from None
    ondisk = meta.get("layout") == "ondisk"
    if version > (ONDISK_VERSION if ondisk else FORMAT_VERSION) or kind not in KINDS[1:] or metric not in METRICS:
        raise _bad(meta_file, f"format version {version}, kind {kind!r}, metric {metric!r} are not all known to "
                   f"this sslhub (format {FORMAT_VERSION}): upgrade sslhub, or")
    if ids is not None and len(ids) != count:
        raise _bad(meta_file, f"lists {len(ids)} ids for {count} vectors")
    size = index_file.stat().st_size if index_file.is_file() else None
    if not size or size != meta.get("index_bytes", size):
        raise _bad(index_file, "missing" if size is None else
                   f"is {size} bytes but meta.json says {meta.get('index_bytes')} (truncated or replaced)")
    if verify and meta.get("index_sha256") and _sha256(index_file) != meta["index_sha256"]:
        raise _bad(index_file, "its content does not match the sha256 in meta.json (corrupt)")
    if ondisk:
        _check_files(path, meta, verify)
    try:  # on disk: the lists memory-mapped read-only from index.ivfdata next to index.faiss
        index = faiss.read_index(str(index_file), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
                                 if ondisk else 0)
    except Exception as e:  # faiss raises RuntimeError on unknown or short data
        raise _bad(index_file, f"FAISS cannot read it ({(str(e) or type(e).__name__).splitlines()[0]})") from None
    if index.ntotal != count or index.d != dim:
        raise _bad(index_file, f"holds {index.ntotal} × {index.d} vectors but meta.json says {count} × {dim}")
    if ondisk:
        try:
            rows = JsonlRows(md_file, path / "offsets.npy", count)
        except (OSError, ValueError) as e:
            raise _bad(md_file, f"unreadable with its offsets.npy ({e})") from None
        out = Index(index, kind, metric, info, rows.ids, rows.metadata)
        out.vectors = open_vectors(meta.get("vectors"), str(path)) if info.get("refine", 0) > 1 else None
        out.refine = int(info.get("refine", 0)) if out.vectors is not None else 0
        return out
    rows = md_file.read_text().splitlines() if md_file.is_file() else []
    if len(rows) != count:
        raise _bad(md_file, f"has {len(rows)} rows for {count} vectors" if md_file.is_file() else "missing")
    try:
        metadata = [json.loads(r) for r in rows] if meta.get("has_metadata", True) else None
    except ValueError as e:
        raise _bad(md_file, f"a row is not JSON ({e})") from None
    return Index(index, kind, metric, info, ids, metadata)


def _check_files(path: Path, meta: dict, verify: bool) -> None:
    """An on-disk index's files: present, of the recorded size and (``verify``) sha256."""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad(path / formats.INDEX_META, "an on-disk index without its 'files' record")
    for name, rec in files.items():
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size != rec.get("bytes"):
            raise _bad(file, "missing" if size is None else f"is {size} bytes but meta.json says {rec.get('bytes')} "
                       "(truncated or replaced)")
        if verify and _sha256(file) != rec.get("sha256"):
            raise _bad(file, "its content does not match the sha256 in meta.json (corrupt)")


def _check_rows(ids: Sequence | None, metadata: Sequence[dict] | None, n: int) -> tuple[list | None, list | None]:
    if ids is not None:
        ids = [int(i) if isinstance(i, np.integer) else i for i in ids]
        if len(ids) != n:
            raise InputError(f"ids has {len(ids)} entries for {n} embeddings: give one id per row")
        if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids):
            raise InputError("ids must be str or int (they are stored in meta.json)")
        if len(set(ids)) != n:
            raise InputError(f"ids must be unique: {n - len(set(ids))} duplicate(s)")
    if metadata is not None:
        metadata = list(metadata)
        if len(metadata) != n:
            raise InputError(f"metadata has {len(metadata)} entries for {n} embeddings: give one dict per row")
        for i, m in enumerate(metadata):
            if not isinstance(m, dict) or {"id", "score"} & m.keys():
                raise InputError(f"metadata[{i}] must be a dict without 'id' or 'score' keys (search_meta adds them)")
            try:
                json.dumps(m)
            except (TypeError, ValueError) as e:
                raise InputError(f"metadata[{i}] is not JSON-serialisable ({e}): store paths, labels as str/int/float")
    return ids, metadata


def _pq_m(dim: int, n: int, budget_bytes: float | None) -> int:
    """PQ sub-quantizers (bytes per code): the most that fit the budget, at most 64, each ≥ 4 dims."""
    options = [m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and dim // m >= 4] or [1]
    for m in options:
        if budget_bytes is None or n * (m + 8) + 256 * dim * 4 <= budget_bytes:  # codes + list ids + codebooks
            return m
    need = (n * (options[-1] + 8) + 256 * dim * 4) / 2**20
    raise InputError(f"memory_budget_mb is too small for {n} vectors even as {options[-1]}-byte PQ codes: "
                     f"give at least {need:.1f}")


def build_index(embeddings: Any, ids: Sequence | None = None, metadata: Sequence[dict] | None = None,
                kind: str = "auto", metric: str = "ip", memory_budget_mb: float | None = None,
                progress: bool = True, *, nlist: int | None = None, nprobe: int | None = None,
                ef_search: int | None = None,
                calibration_queries: Any | None = None, seed: int = 0) -> Index:
    """Index ``embeddings (N, D)`` (rows L2-normalised for ``metric="ip"``) with optional ids and metadata.

    ``kind``: "auto" (see the module docstring), "flat" (exact), "hnsw", "ivf" or "ivfpq"; ``metric``:
    "ip", "cosine" (normalises embeddings and queries) or "l2". ``nlist``/``nprobe`` override the IVF
    choices, ``ef_search`` HNSW's; ``calibration_queries (Q, D)``, held-out queries, tune nprobe / efSearch. ``index.info`` says what was
    chosen and why.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    t0 = time.perf_counter()
    x = _as_matrix(embeddings, "embeddings")  # (N, D) float32
    n, dim = x.shape
    ids, metadata = _check_rows(ids, metadata, n)
    if metric == "cosine":
        x = _normalise(x)
    elif metric == "ip" and np.abs((norms := np.linalg.norm(x[:: max(1, n // 1000)], axis=1)) - 1).max() > 1e-3:
        log.warning("embeddings are not L2-normalised (norms %.3g–%.3g): inner product is not cosine "
                    "similarity; normalise them or pass metric='cosine'", norms.min(), norms.max())
    flat_mb = n * dim * 4 / 2**20
    budget = memory_budget_mb * 2**20 if memory_budget_mb is not None else None
    info: dict = {"count": n, "dim": dim, "metric": metric, "flat_mb": round(flat_mb, 1)}
    if kind == "auto":
        if budget is not None and flat_mb * 2**20 > budget:
            kind, info["reason"] = "ivfpq", f"float32 vectors ({flat_mb:.1f} MB) > memory_budget_mb={memory_budget_mb}"
        elif n < FLAT_BELOW:
            kind, info["reason"] = "flat", f"{n} < {FLAT_BELOW} vectors: exact search is fast enough"
        elif n > HNSW_AUTO_MAX:
            kind, info["reason"] = "ivf", f"{n} > {HNSW_AUTO_MAX} vectors: an HNSW graph would take long to build"
        elif budget is not None and n * (dim * 4 + HNSW_M * 8) > budget:
            kind, info["reason"] = "ivf", f"an HNSW graph (+{HNSW_M * 8} bytes a vector) exceeds memory_budget_mb"
        else:
            kind, info["reason"] = "hnsw", f"{FLAT_BELOW} ≤ {n} ≤ {HNSW_AUTO_MAX} vectors"
    info["kind"] = kind
    fmetric = getattr(faiss, METRICS[metric])
    if kind == "flat":
        index = faiss.IndexFlat(dim, fmetric)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, fmetric)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        info.update(hnsw_M=HNSW_M, ef_construction=int(index.hnsw.efConstruction), ef_search=HNSW_EF_SEARCH)
    else:
        if n < 256:
            raise InputError(f"kind={kind!r} needs at least 256 vectors to train, got {n}: use kind='flat'")
        nlist = nlist or min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n / MIN_PER_LIST)))
        quantizer = faiss.IndexFlat(dim, fmetric)  # (nlist, D) k-means centroids
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, fmetric)
        else:
            m = _pq_m(dim, n, budget)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, fmetric)  # m bytes a vector, 256 codes each
            index.pq.cp.niter, index.pq.cp.max_points_per_centroid = 10, 64  # default 25, 256: slow in few dims
            info.update(pq_m=m, pq_bits=8, code_mb=round(n * (m + 8) / 2**20, 2))
        sample = np.sort(np.random.default_rng(seed).choice(n, TRAIN_PER_LIST * nlist, replace=False)) \
            if n > TRAIN_PER_LIST * nlist else slice(None)
        index.cp.seed = seed
        index.train(x[sample])
        info.update(nlist=nlist, train_size=min(n, TRAIN_PER_LIST * nlist))
    with tqdm(total=n, desc=f"adding to {kind} index", unit="vec", disable=not progress or n <= ADD_CHUNK) as bar:
        for i in range(0, n, ADD_CHUNK):
            index.add(x[i : i + ADD_CHUNK])
            bar.update(min(ADD_CHUNK, n - i))
    out = Index(index, kind, metric, info, ids, metadata)
    queries = None if calibration_queries is None else out._queries(calibration_queries)
    if kind in ("ivf", "ivfpq"):
        out.nprobe = nprobe or _calibrate(out, x, queries, seed)
    elif kind == "hnsw":
        index.hnsw.efSearch = info["ef_search"] = ef_search or _calibrate(out, x, queries, seed)
    info["build_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("built %s index: %s", kind, json.dumps(info, ensure_ascii=False))
    return out


def _calibrate(index: Index, x: np.ndarray | None, queries: np.ndarray | None, seed: int,
               own: np.ndarray | None = None, exact: np.ndarray | None = None) -> int:
    """Tune the search breadth — IVF's ``nprobe`` or HNSW's ``efSearch`` — to the smallest doubling that
    reaches RECALL_TARGET on ``queries`` (default: database rows, own row left out).

    Each step widens by ~√2. IVF starts at ``max(8, nlist/64)`` lists and stops at nlist/4 (little faster
    than exact search); HNSW starts at efSearch 16 and stops at HNSW_EF_MAX. Either stops when a step gains < 0.005
    (IVF-PQ levels off at its quantisation error). Without ``x`` (an on-disk build): ``queries``, their
    database rows ``own`` (or None: held out) and their exact top k + 1 rows ``exact`` come computed."""
    n, fmetric = len(index), getattr(faiss, METRICS[index.metric])
    if exact is None:
        own = None if queries is not None else np.random.default_rng(seed + 1).choice(n, CALIB_QUERIES, replace=False)
        queries = queries if own is None else x[own]  # (Q, D)
    k = min(CALIB_K, n - 1)

    def top_k(found: np.ndarray) -> np.ndarray:  # (Q, k + 1) → (Q, k), leaving out each query's own row
        if own is None:
            return found[:, :k]
        return np.array([[r for r in row if r != i][:k] for row, i in zip(found.tolist(), own.tolist())])

    if index.kind == "hnsw":
        name, value, stop = "ef_search", 16, HNSW_EF_MAX
        params = lambda v: faiss.SearchParametersHNSW(efSearch=v)  # noqa: E731
    else:
        nlist = index.info["nlist"]
        name, value, stop = "nprobe", min(max(8, nlist // 64), nlist), max(1, nlist // 4)
        params = lambda v: faiss.SearchParametersIVF(nprobe=min(v, nlist))  # noqa: E731
    exact = top_k(exact if exact is not None else faiss.knn(queries, x, k + 1, fmetric)[1])  # brute force
    curve, prev = {}, (0, -1.0)
    while True:
        found = top_k(index._search_rows(queries, k + 1, params(value))[1])
        curve[str(value)] = recall = round(_overlap(found, exact), 4)
        if recall - prev[1] < 0.005:  # no gain from the last doubling: keep the cheaper setting
            value, recall = prev
        if recall >= RECALL_TARGET or value >= stop or (value, recall) == prev:
            break
        prev, value = (value, recall), max(value + 1, round(value * CALIB_GROWTH))
    index.info["calibration"] = {"queries": f"{len(queries)} {'database rows' if own is not None else 'given'}",
                                 "k": k, "target": RECALL_TARGET, f"recall_by_{name}": curve}
    if recall < RECALL_TARGET:
        log.warning("%s index: recall@%d vs exact only %.3f (%s %d)", index.kind, k, recall, name, value)
    return value


def compare_with_exact(index: Index, queries: Any, k: int = 10, embeddings: Any | None = None) -> float:
    """Recall@k of ``index`` against exact search: the mean fraction of the exact top k it returns. The
    exact top k comes from ``embeddings (N, D)`` when given (needed for IVF-PQ, which keeps only codes),
    else from the index's own vectors (HNSW storage; IVF-Flat probing every list)."""
    q = index._queries(queries)
    found = index._search_rows(q, k)[1]  # (Q, k) rows
    k = found.shape[1]
    if embeddings is not None:
        x = _as_matrix(embeddings, "embeddings")
        if x.shape != (len(index), index.dim):
            raise InputError(f"embeddings are {x.shape} but the index holds {(len(index), index.dim)}")
        exact = faiss.knn(q, _normalise(x) if index.metric == "cosine" else x, k, getattr(faiss, METRICS[index.metric]))[1]
    elif index.kind in ("flat", "hnsw"):
        exact = (index.faiss.storage if index.kind == "hnsw" else index.faiss).search(q, k)[1]
    elif index.kind == "ivf":
        exact = index._search_rows(q, k, faiss.SearchParametersIVF(nprobe=index._ivf().nlist))[1]
    else:
        raise InputError("an IVF-PQ index keeps only compressed codes: pass the original embeddings=")
    return _overlap(found, exact)
