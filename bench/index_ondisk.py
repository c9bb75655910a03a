"""On-disk index beyond RAM (issue 16): build an IVF-PQ index of 10M real-derived embeddings shard by shard.

Embeddings: pixel PCA (D = 256, L2-normalised) of the CIFAR-10 train images, as ``bench/retrieval.py``
makes them; the database is N noisy copies of those (noise norm 0.3, re-normalised), written float16 in
the ``sslhub embed`` format (``sslhub.inference.embeddings``) under ``bench/out/index_ondisk/emb``, shard by
shard (never N vectors in RAM). Queries: 1,000 CIFAR-10 *test* images (never in the database); 256 more
test images are the held-out calibration queries for nprobe.

Measured: the build in a child process (``build_from_embeddings``, the same as ``sslhub index build
--embeddings``) — wall time of its train / fill / merge steps and the child's peak RSS (``getrusage``
max RSS, which counts the file pages it has mapped) against the float32 size of the vectors; the index
size on disk; then, in this process, load time, recall@10 against exact search (streamed over the shards:
a flat top-k per chunk, merged) and queries/s at 1 and 2 threads (k = 10, one batch of 1,000 queries,
median of ``--runs`` after a warm-up) at three nprobe settings.

    nice python bench/index_ondisk.py [--n 10000000] [--shard 250000] [--memory-budget-mb 4096] [--runs 3]
    python bench/index_ondisk.py --report-only     # rewrite the BENCHMARKS.md section from the results file
Writes bench/results/index_ondisk.json and the "index_ondisk" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import cpu_name, update_section  # noqa: E402
from bench.retrieval import CALIB, embed  # noqa: E402
from sslhub.inference.embeddings import count_embeddings, iter_embedding_shards, write_embedding_shard, write_manifest  # noqa: E402,E501
from sslhub.inference.ondisk import REFINE, build_from_embeddings  # noqa: E402
from sslhub.inference.retrieval import load_index  # noqa: E402

OUT = REPO / "bench/out/index_ondisk"
RESULTS = REPO / "bench/results/index_ondisk.json"
K = 10
# autofaiss's published trade-off: the headline of its README (https://github.com/criteo/autofaiss, also on
# PyPI) and of its announcement (https://medium.com/criteo-engineering/introducing-autofaiss-an-automatic-k-
# nearest-neighbor-indexing-library-at-scale-c90842005a11, Aug 2021); neither states a recall for that run
AUTOFAISS = [{"source": "[autofaiss README](https://github.com/criteo/autofaiss); [Criteo blog, 2021]"
                        "(https://medium.com/criteo-engineering/introducing-autofaiss-an-automatic-k-nearest-"
                        "neighbor-indexing-library-at-scale-c90842005a11)",
              "n": "200M (1 TB of float32)", "index": "chosen by autofaiss (OPQ/IVF-PQ family, HNSW quantizer)",
              "build": "3 h", "memory": "15 GB", "recall": "not stated", "speed": "~10 ms a query"}]


def generate(base: np.ndarray, q: np.ndarray, n: int, shard: int, noise: float, folder: Path) -> np.ndarray:
    """``n`` noisy float16 copies of ``base (B, D)``, shard by shard, in the embeddings format; → the exact
    top-K rows of the queries ``q`` over them (a flat search per shard as it is written, merged)."""
    names = [f"{i:05d}" for i in range((n + shard - 1) // shard)]
    exact_file = folder.parent / f"exact_{n}.npy"
    if (folder / "embeddings.json").is_file() and exact_file.is_file():
        try:
            if count_embeddings(folder) == n:
                print(f"reusing {n:,} embeddings in {folder}", flush=True)
                return np.load(exact_file)
        except Exception:  # unfinished or different: rewrite
            pass
    if folder.exists():
        shutil.rmtree(folder)
    write_manifest(folder, {"model": "pixel-pca256", "data": "cifar10 train, noisy copies", "split": "train",
                            "dim": base.shape[1], "dtype": "float16", "normalized": True, "shards": names})
    t = time.perf_counter()
    best = (np.full((len(q), K), -np.inf, np.float32), np.full((len(q), K), -1, np.int64))
    for i, name in enumerate(names):
        rng = np.random.default_rng(1000 + i)
        rows = np.arange(i * shard, min(n, (i + 1) * shard))
        x = base[rows % len(base)] + noise / np.sqrt(base.shape[1]) * rng.standard_normal(
            (len(rows), base.shape[1]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x16 = x.astype(np.float16)
        del x
        d, r = faiss.knn(q, x16.astype(np.float32), K, faiss.METRIC_INNER_PRODUCT)  # exact, on the stored values
        best = merge_topk(best, (d, r + rows[0]), K)
        meta = [{"id": f"cifar10-train-{r % len(base)}-copy{r // len(base)}", "label": -1, "source": "cifar10"}
                for r in rows.tolist()]
        write_embedding_shard(folder, name, x16, meta)
        print(f"shard {name}: {rows[-1] + 1:,} / {n:,} rows written ({time.perf_counter() - t:.0f} s)", flush=True)
    np.save(exact_file, best[1])
    return best[1]


def merge_topk(best, new, k: int):
    d, i = np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1)
    order = np.argsort(-d, 1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def qps(index, q: np.ndarray, threads: int, runs: int) -> float:  # noqa: D103
    """Queries/s of the row search (codes, then the exact re-ranking when on; no metadata reads)."""
    faiss.omp_set_num_threads(threads)
    index._search_rows(q[:10], K)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        index._search_rows(q, K)
        times.append(time.perf_counter() - t)
    return len(q) / statistics.median(times)


def build_child(args) -> None:
    """The build, alone in a child process (its max RSS is the build's)."""
    calib = np.load(OUT / "calib.npy")
    t = time.perf_counter()
    index = build_from_embeddings(OUT / "emb", OUT / "index", memory_budget_mb=args.memory_budget_mb,
                                  calibration_queries=calib, progress=True, threads=2, refine=args.refine,
                                  opq={"auto": None, "on": True, "off": False}[args.opq])
    info = dict(index.info, wall_s=round(time.perf_counter() - t, 1),
                max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    (OUT / "build.json").write_text(json.dumps(info, ensure_ascii=False))


def report(res: dict) -> str:
    b = res["build"]
    lines = [f"Machine: {res['machine']}.",
             f"Command: `{res['command']}`. Embeddings: {res['data']}; N = {res['n']:,} noisy copies (noise norm "
             f"{res['noise']}, float16, {res['shards']} shards of {res['shard']:,} in the `sslhub embed` format); "
             f"queries: {res['queries']} CIFAR-10 test images, never in the database ({CALIB} more calibrate nprobe). "
             "Recall@10 against exact inner-product search over the same float16 vectors (streamed over the shards); "
             f"queries/s: k = 10, one batch of {res.get('qps_queries', res['queries'])} queries, median of {res['runs']} "
             "runs after a warm-up (the search and the re-ranking; no metadata reads).", "",
             "| N | index | build (train / fill / merge) | peak RSS of the build | raw float32 | index on disk |",
             "|---|---|---|---|---|---|",
             f"| {res['n']:,} | `{b['factory']}` ({b['opq_reason']}) | {b['wall_s']:.0f} s "
             f"({b['seconds']['train']:.0f} / {b['seconds']['fill']:.0f} / {b['seconds']['merge']:.0f} s) | "
             f"{b['max_rss_mb']:,.0f} MB | {res['raw_f32_mb']:,.0f} MB | {res['disk_mb']:,.0f} MB "
             f"(lists {res['ivfdata_mb']:,.0f} MB) |", "",
             f"Load (sha256 of every file, lists memory-mapped): {res['load_s']:.1f} s; the searching process's RSS grew "
             f"by {res['search_rss_growth_mb']:,.0f} MB over loading and all the searches (mapped list pages included).", "",
             "| nprobe | re-ranking | recall@10 vs exact | queries/s, 1 thread | queries/s, 2 threads |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " (calibrated)" if r["nprobe"] == b["nprobe"] else ""
        how = f"exact, {r['refine']}·k candidates" if r.get("refine") else "none (PQ codes)"
        lines.append(f"| {r['nprobe']}{mark} | {how} | {r['recall_at_10']:.3f} | {r['qps_1']:,.0f} | "
                     f"{r['qps_2']:,.0f} |")
    if AUTOFAISS:
        lines += ["", "autofaiss's published trade-offs (its documentation), for comparison:", "",
                  "| source | vectors | index | build | memory | recall | speed |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {a['source']} | {a['n']} | {a['index']} | {a['build']} | {a['memory']} | {a['recall']} | "
                  f"{a['speed']} |" for a in AUTOFAISS]
    lines += ["", res.get("reading", "")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--shard", type=int, default=250_000)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--memory-budget-mb", type=float, default=4096)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--refine", type=int, default=REFINE, help="k·refine PQ candidates re-ranked exactly")
    ap.add_argument("--opq", choices=["auto", "on", "off"], default="auto", help="auto: the variance rule")
    ap.add_argument("--out", default=str(OUT), help="scratch folder (embeddings, index)")
    ap.add_argument("--qps-queries", type=int, default=300, help="queries per timed batch (recall: all)")
    ap.add_argument("--reuse-index", action="store_true", help="search the index a previous run built")
    ap.add_argument("--data-only", action="store_true", help="write the embeddings and exact neighbours, stop")
    ap.add_argument("--build-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from the results file")
    args = ap.parse_args()
    OUT = Path(args.out)
    if args.report_only:
        update_section(REPO / "BENCHMARKS.md", "index_ondisk", "On-disk index beyond RAM (issue 16)",
                       report(json.loads(RESULTS.read_text())))
        return
    if args.build_child:
        return build_child(args)
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cache = OUT / "pca.npz"  # the decode + PCA takes ~10 min on busy cores: kept for reruns
    if cache.is_file():
        z = np.load(cache)
        base, test, data = z["base"], z["test"], str(z["data"])
    else:
        base, test, data = embed(args.data, args.images, args.queries, args.dim)
        np.savez(cache, base=base, test=test, data=np.array(data))
    q, calib = test[:-CALIB], test[-CALIB:]
    np.save(OUT / "calib.npy", calib)
    print(f"embedded {data} in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    exact = generate(base, q, args.n, args.shard, args.noise, OUT / "emb")
    print(f"{args.n:,} embeddings and the exact top-{K} of {len(q)} queries in {time.perf_counter() - t:.0f} s",
          flush=True)
    del base
    if args.data_only:
        return
    cmd = [sys.executable, __file__, "--build-child", "--memory-budget-mb", str(args.memory_budget_mb), "--out", str(OUT),
           "--opq", args.opq, "--refine", str(args.refine)]
    if not (args.reuse_index and (OUT / "build.json").is_file() and (OUT / "index/meta.json").is_file()):
        subprocess.run(cmd, check=True)
    build = json.loads((OUT / "build.json").read_text())
    print(json.dumps(build, ensure_ascii=False), flush=True)
    rss0 = rss_mb()
    t = time.perf_counter()
    index = load_index(OUT / "index")
    load_s = time.perf_counter() - t
    rows, calibrated, refine = [], index.nprobe, index.refine
    timed = q[: args.qps_queries]
    for nprobe in sorted({max(1, calibrated // 2), calibrated, min(index.info["nlist"], calibrated * 2)}):
        index.nprobe = nprobe
        for r in (refine, 0) if refine else (0,):
            index.refine = r
            found = index._search_rows(q, K)[1]  # rows, as search() / search_meta() get them
            recall = float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found.tolist(), exact.tolist())]))
            row = {"nprobe": nprobe, "refine": r, "recall_at_10": round(recall, 4),
                   "qps_1": round(qps(index, timed, 1, args.runs), 1), "qps_2": round(qps(index, timed, 2, args.runs), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    index.refine = refine
    size = {f.name: f.stat().st_size for f in (OUT / "index").iterdir()}
    res = {"machine": f"{cpu_name()}, 2 cores shared with other jobs, faiss {faiss.__version__}, "
                      f"numpy {np.__version__}, Python {platform.python_version()}",
           "command": f"OMP_NUM_THREADS=2 nice python bench/index_ondisk.py --n {args.n} --shard {args.shard} "
                      f"--memory-budget-mb {args.memory_budget_mb:g} --runs {args.runs} --opq {args.opq} "
                      f"--refine {args.refine}",
           "qps_queries": len(timed), "data": data, "n": args.n, "shard": args.shard, "shards": (args.n + args.shard - 1) // args.shard,
           "noise": args.noise, "dim": args.dim, "queries": len(q), "runs": args.runs, "k": K,
           "raw_f32_mb": round(args.n * args.dim * 4 / 2**20, 1), "disk_mb": round(sum(size.values()) / 2**20, 1),
           "ivfdata_mb": round(size.get("index.ivfdata", 0) / 2**20, 1), "files_bytes": size,
           "load_s": round(load_s, 2), "search_rss_growth_mb": round(rss_mb() - rss0),
           "build": build, "rows": rows}
    if args.n < 10_000_000:  # a smoke run: print only
        print(report(res))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.is_file():  # keep the hand-written reading
        res["reading"] = json.loads(RESULTS.read_text()).get("reading", "")
    RESULTS.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    update_section(REPO / "BENCHMARKS.md", "index_ondisk", "On-disk index beyond RAM (issue 16)", report(res))
    print(report(res))


if __name__ == "__main__":
    main()
