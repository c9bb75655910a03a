"""FAISS retrieval: exact flat search against the index ``build_index`` picks, and IVF for comparison.

Embeddings with real structure: CIFAR-10 train images (``../shared/data/cifar10``, 50,000; the bundled
1,000-image sample when that is absent) → pixel PCA to D dims → L2-normalised. Pixel PCA rather than a
random-init CNN: a random ResNet-18's features collapse (mean cosine 0.81, ~3 effective dimensions on
this data). A database of N vectors is N noisy copies of those (noise of norm 0.3, re-normalised): 2
copies per image at 100k, 20 at 1M.
Queries are CIFAR-10 *test* images, never in the database, embedded the same way. The auto index
(HNSW up to 2M vectors) and an IVF-Flat index are both calibrated (efSearch / nprobe) on 256 held-out
test images (``calibration_queries``, never among the 1,000 measured ones): calibrating on database
rows overrates recall on near-duplicate copies (see sslhub/inference/retrieval.py).

Measured per N and index: build time (one build; includes k-means and nprobe calibration), queries/s
for 1,000 queries at k = 10 in one batch on 2 threads (median of 3 runs after a warm-up), recall@10
against exact search (``compare_with_exact``). Target: recall@10 ≥ 0.95 at ≥ 10× exact queries/s at 1M.

    python bench/retrieval.py [--sizes 100000 1000000] [--dim 256] [--runs 3] [--no-write]
Writes bench/out/retrieval.json and the table in BENCHMARKS.md (section between markers); ``--no-write``
only prints (for smoke runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import update_section  # noqa: E402
from sslhub.data.images import decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.inference.retrieval import build_index, compare_with_exact  # noqa: E402

CALIB = 256  # held-out test images for calibration_queries


def embed(data: str, images: int, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Pixel-PCA embeddings: CIFAR-10 train ``(B, dim)`` and test images ``(Q + CALIB, dim)``, L2-normalised."""
    data = data if (Path(data) / "dataset.json").is_file() else str(REPO / "data/cifar10-sample")
    splits = []
    for split, n in (("train", images), ("test", queries + CALIB)):
        src = open_source(data, split)
        src.samples = src.samples[:n]
        splits.append(decode_all(src, 32, progress=False).images.float().flatten(1) / 255)  # (n, 3072)
    train, test = splits
    mu = train.mean(0)
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(train - mu, q=dim, center=False)  # (3072, dim) principal directions
    return (*(F.normalize((x - mu) @ v, dim=1).numpy() for x in (train, test)),
            f"{data} ({train.shape[0]} train images, {test.shape[0]} test images)")


def derived(base: np.ndarray, n: int, noise: float, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """``n`` noisy copies of ``base (B, D)`` (row i from base[i % B]), re-normalised: ``(n, D)`` float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = base[np.arange(s, e) % len(base)] + noise / np.sqrt(base.shape[1]) * rng.standard_normal(
            (e - s, base.shape[1]), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def queries_per_s(index, q: np.ndarray, runs: int) -> float:
    index.search(q[:10], 10)  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        index.search(q, 10)
        times.append(time.perf_counter() - t)
    return len(q) / statistics.median(times)


def params(info: dict) -> str:
    keys = ("nlist", "nprobe", "pq_m", "hnsw_M", "ef_construction", "ef_search")
    return ", ".join(f"{k} {info[k]}" for k in keys if k in info) or "exact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    ap.add_argument("--images", type=int, default=50_000, help="CIFAR-10 train images to embed")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.3, help="norm of the noise added to each copy")
    ap.add_argument("--runs", type=int, default=3, help="query timing repeats (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only: no bench/out json, no BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    base, test, data = embed(args.data, args.images, args.queries, args.dim)
    q, calib = test[:-CALIB], test[-CALIB:]  # measured queries (≤ --queries, D); held-out calibration (CALIB, D)
    print(f"embedded {data} in {time.perf_counter() - t:.0f} s", flush=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                          f"faiss {faiss.__version__}, torch {torch.__version__}",
               "data": data, "dim": args.dim, "noise": args.noise, "queries": len(q), "k": 10, "runs": args.runs,
               "rows": []}
    for n in args.sizes:
        x = derived(base, n, args.noise)
        exact_qps = None
        for kind, name, extra in (("flat", "flat", {}),
                                  ("auto", "auto", {"calibration_queries": calib}),
                                  ("ivf", "ivf", {"calibration_queries": calib})):
            t = time.perf_counter()
            index = build_index(x, kind=kind, progress=True, **extra)
            build_s = time.perf_counter() - t
            qps = queries_per_s(index, q, args.runs)
            exact_qps = exact_qps or qps
            recall = compare_with_exact(index, q, 10, embeddings=x)
            row = {"n": n, "index": name.replace("auto", f"auto → {index.kind}"), "params": params(index.info),
                   "build_s": round(build_s, 2), "qps": round(qps, 1), "vs_exact": round(qps / exact_qps, 2),
                   "recall_at_10": round(recall, 4), "info": index.info}
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "info"}, ensure_ascii=False), flush=True)
            del index
    results["target"] = []
    for r in results["rows"]:
        if r["index"].startswith("auto") and r["n"] >= 1_000_000:
            met = r["recall_at_10"] >= 0.95 and r["vs_exact"] >= 10
            results["target"].append(f"{r['index']} at {r['n']:,}: recall@10 {r['recall_at_10']:.3f} at "
                                     f"{r['vs_exact']}× exact queries/s → {'met' if met else 'NOT met'}")
    sizes = " ".join(str(s) for s in args.sizes)
    lines = [f"Machine: {results['machine']}.",
             f"Command: `python bench/retrieval.py --sizes {sizes} --dim {args.dim} --runs {args.runs}`; "
             f"embeddings: pixel PCA (D = {args.dim}, L2-normalised) of {data}; the N database vectors are "
             f"noisy copies of the train embeddings (noise norm {args.noise}), queries {len(q)} test images (never "
             f"in the database; {CALIB} more test images are the held-out calibration queries for nprobe / efSearch). "
             f"Queries/s: k = 10, one batch, median of {args.runs} runs; build: one run, including k-means and "
             "calibration; "
             "recall@10 against exact flat search.", "",
             "| N | index | parameters | build s | queries/s | × exact | recall@10 vs exact |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['n']:,} | {r['index']} | {r['params']} | {r['build_s']} | {r['qps']} | {r['vs_exact']}× "
                     f"| {r['recall_at_10']:.3f} |")
    if results["target"]:
        lines += ["", "Target (issue 3): recall@10 ≥ 0.95 at ≥ 10× exact queries/s at 1M — "
                  + "; ".join(results["target"]) + "."]
    if args.no_write:
        print("\n".join(lines))
        return
    out = REPO / "bench/out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    update_section(REPO / "BENCHMARKS.md", "retrieval", "FAISS retrieval (issue 3)", "\n".join(lines))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, ensure_ascii=False))

if __name__ == "__main__":
    main()
