"""Every image-only method under one compute budget on CIFAR-10: k-NN and linear-probe top-1 vs random init.

Each registered method that needs no text trains from its own recipe (``recipes/<method>_cifar10.yaml``)
through the real trainer, with the same backbone, batch, data and **the same training compute**: a budget
of floating-point operations (``--budget-tflop``) divided by the method's measured cost of one training step
(``torch.utils.flop_counter`` over one forward + backward at the bench batch; multi-crop, momentum encoders
and 4-rotation batches cost what they cost) gives its number of steps.  A FLOP budget is the CPU budget
that does not depend on what else the machine runs; the CPU seconds each run took are reported beside it.

The recipe's schedules keep their share of the run: ``optim.warmup_epochs`` and every ``method_args``
field ending in ``_epochs`` (DINO's teacher-temperature warm-up and frozen last layer, SwAV's frozen
prototypes, …) are scaled by (run epochs / recipe epochs); momentum schedules already follow ``max_steps``.

Evaluation, on the exported checkpoint loaded with ``sslhub.load_encoder`` (as a user would): L2-normalised
features of a class-balanced ``--bank`` subset of the training split and of the whole test split;
weighted k-NN (k = 20 and 200, τ = 0.07) and a logistic-regression linear probe (C picked on a held-out
20 % of the bank).  "random init" is the same backbone exported untrained.

    python bench/methods_cifar10.py                       # everything, ~45 min on 2 cores
    python bench/methods_cifar10.py --methods byol dino   # re-run some; the others are read from bench/out
Writes bench/out/methods_cifar10/<method>.json, bench/figures/methods_cifar10.png and the section in
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import cpu_name, update_section  # noqa: E402
from sslhub import load_encoder  # noqa: E402
from sslhub.data.images import DecodedImages, decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.encoder import Backbone  # noqa: E402
from sslhub.eval.knn import knn_eval  # noqa: E402
from sslhub.eval.linear import balanced_subset, linear_probe  # noqa: E402
from sslhub.export import export_encoder  # noqa: E402
from sslhub.methods.base import Batch  # noqa: E402
from sslhub.recipe import load_recipe  # noqa: E402
from sslhub.registry import list_methods  # noqa: E402
from sslhub.trainer import Trainer  # noqa: E402

OUT = REPO / "bench/out/methods_cifar10"
FIGURE = REPO / "bench/figures/methods_cifar10.png"
RANDOM = "random init"
log = logging.getLogger("bench.methods")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads), in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class PreloadedTrainer(Trainer):
    """The real trainer, fed the training split decoded once for all methods."""

    def __init__(self, recipe, out, data: DecodedImages):
        super().__init__(recipe, out, progress=False)
        self._preloaded = data

    def _data(self) -> DecodedImages:
        return self._preloaded


def recipe_path(method: str) -> Path:
    path = REPO / "recipes" / f"{method}_cifar10.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: every image method needs a CIFAR-10 recipe for this benchmark")
    return path


def base_overrides(args) -> list[str]:
    return [f"encoder.model_args.channels=[{','.join(map(str, args.channels))}]", f"data.batch_size={args.batch}",
            "data.num_workers=0", "eval.knn.test=", "train.log_every=10", "train.ckpt_every=100000",
            "train.precision=fp32", f"seed={args.seed}"]


def step_flops(method_name: str, overrides: list[str], batch: int) -> float:
    """FLOPs of one training step (forward + backward) at ``batch`` images."""
    r = load_recipe(recipe_path(method_name), overrides)
    torch.manual_seed(0)
    m = list_methods()[method_name].create(r.encoder, r.method_args)
    m.train()
    s = r.encoder.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        out = m.loss(Batch(images, rng=torch.Generator().manual_seed(0)))
        out["loss"].backward()
    return float(fc.get_total_flops())


def scaled_schedules(method_name: str, overrides: list[str], run_epochs: float) -> list[str]:
    """Epoch-denominated schedules scaled by run length / recipe length (each keeps its share of training)."""
    r = load_recipe(recipe_path(method_name), overrides)
    ratio = run_epochs / r.train.epochs
    out = [f"optim.warmup_epochs={r.optim.warmup_epochs * ratio:.6g}"]
    for f in dataclasses.fields(r.method_args):
        if f.name.endswith("_epochs"):
            out.append(f"method_args.{f.name}={getattr(r.method_args, f.name) * ratio:.6g}")
    return out


def evaluate(export: Path, bank: DecodedImages, test: DecodedImages) -> dict:
    enc = load_encoder(export)
    fb = enc.embed_images(bank.images, batch_size=512, normalize=True, progress=False)
    ft = enc.embed_images(test.images, batch_size=512, normalize=True, progress=False)
    knn = knn_eval(fb, bank.labels, ft, test.labels, ks=(20, 200))
    lin = linear_probe(fb, bank.labels, ft, test.labels)
    return {"knn_top1_k20": knn["top1@k=20"], "knn_top1_k200": knn["top1@k=200"], "linear_top1": lin["top1"],
            "linear_C": lin["C"]}


def run_method(name: str, args, train: DecodedImages, bank: DecodedImages, test: DecodedImages) -> dict:
    over = base_overrides(args)
    flops = step_flops(name, over, args.batch)
    steps = max(1, int(args.budget_tflop * 1e12 // flops))
    steps_per_epoch = len(train) // args.batch
    run_epochs = steps / steps_per_epoch
    over += scaled_schedules(name, over, run_epochs) + [f"train.max_steps={steps}"]
    recipe = load_recipe(recipe_path(name), over)
    out_dir = OUT / "runs" / name
    log.info("%s: %.1f GFLOP/step → %d steps (%.2f epochs)", name, flops / 1e9, steps, run_epochs)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result = PreloadedTrainer(recipe, out_dir, train).fit()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"method": name, "paper": list_methods()[name].paper, "gflop_per_step": round(flops / 1e9, 2),
            "steps": steps, "epochs": round(run_epochs, 3), "train_wall_s": round(wall, 1),
            "train_cpu_s": round(cpu, 1), "overrides": over, **evaluate(Path(result["export"]), bank, test)}


def run_random(args, bank: DecodedImages, test: DecodedImages) -> dict:
    r = load_recipe(recipe_path("simclr"), base_overrides(args))
    torch.manual_seed(args.seed)
    folder = export_encoder(Backbone(r.encoder), OUT / "runs" / "random" / "export", {"method": "none (random init)"})
    return {"method": RANDOM, "gflop_per_step": 0, "steps": 0, "epochs": 0, "train_wall_s": 0, "train_cpu_s": 0,
            **evaluate(folder, bank, test)}


def image_methods() -> list[str]:
    return [n for n, cls in list_methods().items() if not cls.needs_text]


# ------------------------------------------------------------------------------------------- report
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["method"] == RANDOM)
    trained = sorted((r for r in rows if r["method"] != RANDOM), key=lambda r: r["linear_top1"])
    x = np.arange(len(trained))
    fig, ax = plt.subplots(figsize=(1.0 * len(trained) + 3, 4.2))
    for off, key, label, color in ((-0.2, "knn_top1_k200", "k-NN top-1 (k=200)", "#4C72B0"),
                                   (0.2, "linear_top1", "linear probe top-1", "#DD8452")):
        bars = ax.bar(x + off, [r[key] for r in trained], 0.38, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.axhline(base[key], color=color, ls="--", lw=1.2, label=f"{label}, random init")
    ax.set_xticks(x, [r["method"] for r in trained], rotation=30, ha="right")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_ylim(0, max(r["linear_top1"] for r in rows) * 1.25)
    ax.set_title("Same backbone, same training FLOPs: frozen-feature accuracy")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def sweep_command(args) -> str:
    """The one command that regenerates the whole table with these settings."""
    cmd = ["python", "bench/methods_cifar10.py"]
    defaults = {"budget_tflop": 10.0, "batch": 128, "channels": [16, 32, 64, 128], "bank": 10_000, "seed": 0}
    for k, default in defaults.items():
        v = getattr(args, k)
        if v != default:
            cmd += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return shlex.join(cmd)


def report(rows: list[dict], args, command: str) -> str:
    base = next(r for r in rows if r["method"] == RANDOM)
    trained = sorted((r for r in rows if r["method"] != RANDOM), key=lambda r: -r["linear_top1"])
    lines = [
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Command (the whole sweep): `{command}`; rows can be re-run with `--methods NAME …` "
        f"(the others are read from bench/out).",
        f"Data: CIFAR-10 (`{args.data}`), training split {args.n_train:,} images; k-NN bank / probe training set: "
        f"{args.bank:,} class-balanced training images; test: {args.n_test:,} images. Backbone: ResNet-18, CIFAR stem, "
        f"channels {args.channels}; batch {args.batch}; budget **{args.budget_tflop:g} TFLOP of training per method** "
        f"(steps = budget / measured FLOPs per step); seed {args.seed}, one run per method (a full sweep costs "
        f"~45 min here, so no median over seeds: differences of ~1 point are within seed noise).",
        "",
        "| method | GFLOP/step | steps | epochs | train CPU s (wall s) | k-NN top-1 k=20 | k-NN top-1 k=200 | "
        "linear top-1 | Δ linear vs random |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in trained:
        lines.append(f"| {r['method']} | {r['gflop_per_step']} | {r['steps']} | {r['epochs']} | "
                     f"{r['train_cpu_s']:.0f} ({r['train_wall_s']:.0f}) | {r['knn_top1_k20']} | {r['knn_top1_k200']} | "
                     f"{r['linear_top1']} | {r['linear_top1'] - base['linear_top1']:+.2f} |")
    lines.append(f"| *random init* | – | 0 | 0 | – | {base['knn_top1_k20']} | {base['knn_top1_k200']} | "
                 f"{base['linear_top1']} | – |")
    lines += ["", f"![k-NN and linear-probe top-1 per method]({FIGURE.relative_to(REPO)})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    p.add_argument("--methods", nargs="*", default=None, help="methods to (re)run; default: every image method")
    p.add_argument("--budget-tflop", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--bank", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from bench/out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sslhub").setLevel(logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/methods_cifar10.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:
        if not (Path(args.data) / "dataset.json").is_file():
            raise SystemExit(f"{args.data}: no CIFAR-10 there (needs ../shared/data/cifar10 or --data PATH)")
        train = decode_all(open_source(args.data, "train"), 32, num_workers=2, desc="decoding train")
        test = decode_all(open_source(args.data, "test"), 32, num_workers=2, desc="decoding test")
        idx = torch.from_numpy(balanced_subset(train.labels.numpy(), args.bank / len(train), seed=0))
        bank = DecodedImages(train.images[idx], train.labels[idx], [], train.classes, [])
        todo = args.methods if args.methods else [RANDOM, *image_methods()]
        for name in todo:
            row = run_random(args, bank, test) if name == RANDOM else run_method(name, args, train, bank, test)
            row.update(n_train=len(train), n_test=len(test), bank=len(bank), budget_tflop=args.budget_tflop,
                       channels=args.channels, batch=args.batch, seed=args.seed, command=command)
            (OUT / f"{name.replace(' ', '_')}.json").write_text(json.dumps(row, indent=1))
            log.info("%s: %s", name, {k: row[k] for k in ("knn_top1_k200", "linear_top1", "train_cpu_s")})
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    if not any(r["method"] == RANDOM for r in rows):
        raise SystemExit("no random-init row in bench/out: run without --methods first")
    first = next(r for r in rows if r["method"] == RANDOM)
    setting = ("budget_tflop", "channels", "batch", "seed", "n_train", "bank")
    odd = [r["method"] for r in rows if any(r[k] != first[k] for k in setting)]
    if odd:
        raise SystemExit(f"{', '.join(odd)} in {OUT} ran with other settings than random init "
                         f"({', '.join(setting)}): re-run them, or everything")
    for k in ("n_train", "n_test", "bank", "budget_tflop", "channels", "batch", "seed"):
        setattr(args, k, first[k])
    plot(rows, FIGURE)
    update_section(REPO / "BENCHMARKS.md", "methods_cifar10", "SSL methods on CIFAR-10 under one compute budget (issue 7)",
                   report(rows, args, sweep_command(args)))
    print(json.dumps({r["method"]: r["linear_top1"] for r in rows}))


if __name__ == "__main__":
    main()
