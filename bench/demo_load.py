"""Load on the demo's zero-shot endpoint: C concurrent clients × R requests each, errors and latency.

The server is ``sslhub demo`` in its own process (its defaults: 2 requests computed at once, up to
64 waiting) over the bundled Flickr8k sample's test split. Each client is a ``gradio_client.Client``
in its own thread that sends R requests back to back — upload one of the bundled example images,
five labels, the ``default`` template — so at most C requests are in flight. A request's latency is
its whole round trip: upload, queue wait, compute, result. Errors are requests that raised or came
back without the five labels. Before the load, a few requests on the idle server give the latency
of one request alone.

No pretrained weights can be downloaded here, so the model is open_clip's ViT-B-32 architecture with
random weights (the compute per request does not depend on the weights).

    python bench/demo_load.py [--arch ViT-B-32] [--clients 50] [--requests 10]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import update_section  # noqa: E402
from bench.zeroshot import save_open_clip  # noqa: E402

LABELS = "dog, horse, boat, mountain, balloon"
EXAMPLES = sorted((REPO / "demos" / "examples").glob("*.jpg"))


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sslhub", "demo", str(model), "--data",
                                 str(REPO / "data" / "flickr8k-sample"), "--split", "test", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the demo did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def one_request(client, image: Path) -> tuple[float, str | None]:
    """Latency in seconds and an error description (None when the answer is right)."""
    from gradio_client import handle_file

    t = time.perf_counter()
    try:
        out, _ = client.predict(handle_file(str(image)), LABELS, "default", api_name="/zero_shot")
        got = {c["label"] for c in out["confidences"]}
        error = None if got == {s.strip() for s in LABELS.split(",")} else f"labels {sorted(got)}"
    except Exception as e:  # any failure of the round trip is an error of the run
        error = f"{type(e).__name__}: {e}"
    return time.perf_counter() - t, error


def load(url: str, clients: int, requests: int) -> tuple[list[float], list[str], float]:
    """All clients connect, then start together; → latencies, errors, wall-clock seconds."""
    from gradio_client import Client

    conns = [Client(url, verbose=False) for _ in range(clients)]
    latencies, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def user(i: int) -> None:
        start.wait()
        for r in range(requests):
            dt, err = one_request(conns[i], EXAMPLES[(i + r) % len(EXAMPLES)])
            with lock:
                latencies.append(dt)
                if err:
                    errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]  # nearest rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=10, help="per client, back to back")
    ap.add_argument("--idle", type=int, default=5, help="requests on the idle server first")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of updating BENCHMARKS.md")
    args = ap.parse_args()
    from gradio_client import Client

    from bench.train_throughput import _cpu_name

    folder = Path(tempfile.mkdtemp())
    save_open_clip(args.arch, folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()[0]
    server = start_server(folder, port, folder / "server.log")
    url = f"http://127.0.0.1:{port}/"
    try:
        idle_client = Client(url, verbose=False)
        one_request(idle_client, EXAMPLES[0])  # warm-up: builds and caches the class matrix
        idle = [one_request(idle_client, EXAMPLES[i % len(EXAMPLES)]) for i in range(args.idle)]
        idle_errors = [e for _, e in idle if e]
        latencies, errors, wall = load(url, args.clients, args.requests)
    finally:
        server.terminate()
        server.wait(timeout=60)
    load_after = os.getloadavg()[0]
    n = len(latencies)
    res = {"arch": args.arch, "clients": args.clients, "requests_per_client": args.requests, "requests": n,
           "errors": len(errors) + len(idle_errors), "first_errors": (idle_errors + errors)[:5],
           "idle_median_s": round(statistics.median(dt for dt, _ in idle), 3),
           "median_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 95), 3),
           "max_s": round(max(latencies), 3), "wall_s": round(wall, 1), "throughput_rps": round(n / wall, 2),
           "loadavg_before_after": [round(load_before, 2), round(load_after, 2)]}
    body = "\n".join([
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}; 1-minute load average {load_before:.1f} before the run (above 0: other "
        f"jobs shared the machine, and latencies are pessimistic) and {load_after:.1f} at its end (this run's "
        "server and client threads included).",
        f"Command: `python bench/demo_load.py --arch {args.arch} --clients {args.clients} --requests "
        f"{args.requests}`; server: `sslhub demo` (queue: 2 computed at once, 64 waiting at most) with open_clip "
        f"`{args.arch}` (random weights) over data/flickr8k-sample (test split, 100 images); each request uploads "
        "a 128×128 example image and asks for 5 labels (`default` template; the class matrix is cached after "
        "the first request). Latency: one whole round trip as the client sees it.", "",
        "| load | requests | errors | median s | p95 s | max s | throughput req/s |", "|---|---|---|---|---|---|---|",
        f"| 1 client, idle server | {len(idle)} | {len(idle_errors)} | {res['idle_median_s']:.3f} | – | – | – |",
        f"| {args.clients} concurrent clients × {args.requests} requests | {n} | {len(errors)} | "
        f"{res['median_s']:.3f} | {res['p95_s']:.3f} | {res['max_s']:.3f} | {res['throughput_rps']:.2f} |", "",
        f"Target (issue 6): {args.clients} clients × {args.requests} requests with 0 errors → "
        + ("**met**." if res["errors"] == 0 else f"**NOT met** ({res['errors']} errors: {res['first_errors']})."),
        f"Under load most of a request's latency is its wait in the queue behind up to {args.clients - 1} others; "
        f"the server answered {res['throughput_rps']:.2f} requests/s against {1 / res['idle_median_s']:.2f}/s for "
        "one client on the idle server."])
    if args.no_write:
        print(body)
    else:
        update_section(REPO / "BENCHMARKS.md", "demo_load", "Demo load (issue 6)", body)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
