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

    python bench/methods_cifar10.py                       # everything, 3 seeds, ~36 min a seed on 2 cores
    python bench/methods_cifar10.py --methods byol dino   # re-run some; the others are read from bench/results
    python bench/methods_cifar10.py --resume              # only the (seed, method) rows not yet measured
Writes bench/results/methods_cifar10/seed<N>/<method>.json (kept in git: the table is rebuilt from them with
``--report-only``), bench/figures/methods_cifar10.png and the section in BENCHMARKS.md: the median over seeds
with the min–max range.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import re
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
from sslhub.atomic import atomic_write_text  # noqa: E402
from sslhub.data.images import DecodedImages, decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.eval.knn import knn_eval  # noqa: E402
from sslhub.eval.linear import balanced_subset, linear_probe  # noqa: E402
from sslhub.methods.base import Batch  # noqa: E402
from sslhub.methods.registry import list_methods  # noqa: E402
from sslhub.models.backbone import Backbone  # noqa: E402
from sslhub.publish.export import export_encoder  # noqa: E402
from sslhub.train.recipe import load_recipe  # noqa: E402
from sslhub.train.trainer import Trainer  # noqa: E402

OUT = REPO / "bench/out/methods_cifar10"  # training runs (checkpoints, exports): not kept
RESULTS = REPO / "bench/results/methods_cifar10"  # one JSON per (seed, method): kept in git, the table's source
DEFAULT_SEEDS = [0, 1, 2]
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
        super().__init__(recipe, out, progress=False, overwrite=True)  # a re-run replaces its run
        self._preloaded = data

    def load_data(self) -> None:
        self.data, self.n_train = self._preloaded, len(self._preloaded)


def recipe_path(method: str) -> Path:
    path = REPO / "recipes" / f"{method}_cifar10.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: every image method needs a CIFAR-10 recipe for this benchmark")
    return path


def base_overrides(args) -> list[str]:
    return [f"encoder.model_args.channels=[{','.join(map(str, args.channels))}]", f"data.batch_size={args.batch}",
            "data.num_workers=0", "eval.knn.test=", "train.log_every=10", "train.ckpt_every=100000",
            "train.precision=fp32", f"seed={args.seed}"]


_FLOPS: dict[tuple, float] = {}  # (recipe, overrides) → FLOPs per step: the same for every seed, counted once


def step_flops(method_name: str, overrides: list[str], batch: int, path: Path | None = None) -> float:
    """FLOPs of one training step (forward + backward) at ``batch`` images, for ``path`` (default: the method's
    CIFAR-10 recipe) with ``overrides`` (cached per recipe and overrides, the seed aside)."""
    path = path or recipe_path(method_name)
    key = (str(path), *(o for o in overrides if not o.startswith("seed=")))
    if key in _FLOPS:
        return _FLOPS[key]
    r = load_recipe(path, overrides)
    torch.manual_seed(0)
    m = list_methods()[r.method].create(r.encoder, r.method_args)
    m.train()
    s = r.encoder.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        out = m.loss(Batch(images, rng=torch.Generator().manual_seed(0)))
        out["loss"].backward()
    _FLOPS[key] = float(fc.get_total_flops())
    return _FLOPS[key]


def scaled_schedules(method_name: str, overrides: list[str], run_epochs: float, path: Path | None = None) -> list[str]:
    """Epoch-denominated schedules scaled by run length / recipe length (each keeps its share of training)."""
    r = load_recipe(path or recipe_path(method_name), overrides)
    ratio = run_epochs / r.train.epochs
    out = [f"optim.warmup_epochs={r.optim.warmup_epochs * ratio:.6g}"]
    for f in dataclasses.fields(r.method_args):
        if f.name.endswith("_epochs"):
            out.append(f"method_args.{f.name}={getattr(r.method_args, f.name) * ratio:.6g}")
    return out


def evaluate(export: Path, bank: DecodedImages, test: DecodedImages, enc=None) -> dict:
    """k-NN (k = 20, 200) and the linear probe on L2-normalised features of ``export`` (or the loaded ``enc``)."""
    enc = enc or load_encoder(export)
    fb = enc.embed_images(bank.images, batch_size=512, normalize=True, progress=False)
    ft = enc.embed_images(test.images, batch_size=512, normalize=True, progress=False)
    knn = knn_eval(fb, bank.labels, ft, test.labels, ks=(20, 200))
    lin = linear_probe(fb, bank.labels, ft, test.labels)
    return {"knn_top1_k20": knn["top1@k=20"], "knn_top1_k200": knn["top1@k=200"], "linear_top1": lin["top1"],
            "linear_C": lin["C"]}


def pretext(trainer: Trainer, test: DecodedImages) -> dict:
    """The method's own pretext metrics (``Method.evaluate``) on the whole test split, {} for methods without."""
    trainer.method.eval()
    with torch.no_grad():
        return {k: round(float(v), 4) for k, v in trainer.method.evaluate(test.images, test.labels).items()}


def run_method(name: str, args, train: DecodedImages, bank: DecodedImages, test: DecodedImages,
               extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Train ``name`` from its recipe (plus ``extra`` overrides: a variant) for the FLOP budget; evaluate it."""
    over = base_overrides(args) + list(extra)
    flops = step_flops(name, over, args.batch)
    steps = max(1, int(args.budget_tflop * 1e12 // flops))
    steps_per_epoch = len(train) // args.batch
    run_epochs = steps / steps_per_epoch
    over += scaled_schedules(name, over, run_epochs) + [f"train.max_steps={steps}"]
    recipe = load_recipe(recipe_path(name), over)
    out_dir = OUT / "runs" / f"seed{args.seed}" / (name + ("-" + "-".join(extra).replace("/", "_") if extra else ""))
    log.info("%s: %.1f GFLOP/step → %d steps (%.2f epochs)", name, flops / 1e9, steps, run_epochs)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    trainer = PreloadedTrainer(recipe, out_dir, train)
    result = trainer.fit()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"method": name, "paper": list_methods()[name].paper, "gflop_per_step": round(flops / 1e9, 2),
            "steps": steps, "epochs": round(run_epochs, 3), "train_wall_s": round(wall, 1),
            "train_cpu_s": round(cpu, 1), "overrides": over, "pretext": pretext(trainer, test),
            **evaluate(Path(result["export"]), bank, test)}


def run_random(args, bank: DecodedImages, test: DecodedImages) -> dict:
    r = load_recipe(recipe_path("simclr"), base_overrides(args))
    torch.manual_seed(args.seed)
    folder = export_encoder(Backbone(r.encoder), OUT / "runs" / f"seed{args.seed}" / "random" / "export", {"method": "none (random init)"})
    return {"method": RANDOM, "gflop_per_step": 0, "steps": 0, "epochs": 0, "train_wall_s": 0, "train_cpu_s": 0,
            **evaluate(folder, bank, test)}


def image_methods() -> list[str]:
    """Image methods with a CIFAR-10 recipe (the ViT-only masked-modeling methods have an Imagenette one:
    bench/mim_imagenette.py)."""
    return [n for n, cls in list_methods().items()
            if not cls.needs_text and (REPO / "recipes" / f"{n}_cifar10.yaml").is_file()]


# ------------------------------------------------------------------------------------------- report
METRICS = ("knn_top1_k20", "knn_top1_k200", "linear_top1")
SETTING = ("budget_tflop", "channels", "batch", "n_train", "bank")  # what every row of one table shares


def load_rows() -> dict[str, list[dict]]:
    """method → its result rows, one per seed found under bench/results (seed order)."""
    rows: dict[str, list[dict]] = {}
    for d in sorted(RESULTS.glob("seed*"), key=lambda d: int(d.name[4:])):
        for f in sorted(d.glob("*.json")):
            r = json.loads(f.read_text())
            rows.setdefault(r["method"], []).append(r)
    if RANDOM not in rows:
        raise SystemExit(f"no random-init row under {RESULTS}: run without --methods first")
    first = rows[RANDOM][0]
    odd = sorted({r["method"] for rs in rows.values() for r in rs if any(r[k] != first[k] for k in SETTING)})
    if odd:
        raise SystemExit(f"{', '.join(odd)} under {RESULTS} ran with other settings than random init "
                         f"({', '.join(SETTING)}): re-run them, or everything")
    return rows


def summary(rs: list[dict]) -> dict:
    """Median and range over seeds of each metric, and of the training cost."""
    out = {"method": rs[0]["method"], "seeds": [r["seed"] for r in rs]}
    for k in (*METRICS, "train_cpu_s", "train_wall_s"):
        v = np.array([r[k] for r in rs], dtype=float)
        out[k], out[k + "_min"], out[k + "_max"] = float(np.median(v)), float(v.min()), float(v.max())
    for k in ("gflop_per_step", "steps", "epochs"):
        out[k] = rs[0][k]
    keys = [k for k in rs[0].get("pretext", {}) if all(k in r.get("pretext", {}) for r in rs)]
    out["pretext"] = {k: float(np.median([r["pretext"][k] for r in rs])) for k in keys}
    return out


def pretext_cell(r: dict) -> str:
    """The method's held-out pretext accuracies (median over seeds), e.g. ``rotation_acc 71.2``; – for none
    (per-offset figures such as CPC's ``cpc_acc_k2`` are left to the JSON)."""
    return ", ".join(f"{k} {100 * v:.3g}" for k, v in r.get("pretext", {}).items()
                     if not re.search(r"_k\d+$", k)) or "–"


def plot(stats: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in stats if r["method"] == RANDOM)
    trained = sorted((r for r in stats if r["method"] != RANDOM), key=lambda r: r["linear_top1"])
    x = np.arange(len(trained))
    fig, ax = plt.subplots(figsize=(1.0 * len(trained) + 3, 4.2))
    for off, key, label, color in ((-0.2, "knn_top1_k200", "k-NN top-1 (k=200)", "#4C72B0"),
                                   (0.2, "linear_top1", "linear probe top-1", "#DD8452")):
        med = np.array([r[key] for r in trained])
        err = np.array([[m - r[key + "_min"] for m, r in zip(med, trained)],
                        [r[key + "_max"] - m for m, r in zip(med, trained)]])
        bars = ax.bar(x + off, med, 0.38, yerr=err, capsize=3, error_kw={"lw": 1}, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.axhline(base[key], color=color, ls="--", lw=1.2, label=f"{label}, random init")
    ax.set_xticks(x, [r["method"] for r in trained], rotation=30, ha="right")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_ylim(0, max(r["linear_top1_max"] for r in stats) * 1.25)
    n = sorted({len(r["seeds"]) for r in stats})
    ax.set_title(f"Same backbone, same training FLOPs: frozen-feature accuracy "
                 f"(median of {'/'.join(map(str, n))} seeds, bars = min–max)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def sweep_command(first: dict, seeds: list[int]) -> str:
    """The one command that regenerates the whole table with these settings."""
    cmd = ["python", "bench/methods_cifar10.py"]
    defaults = {"budget_tflop": 10.0, "batch": 128, "channels": [16, 32, 64, 128], "bank": 10_000}
    for k, default in defaults.items():
        v = first[k]
        if v != default:
            cmd += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    if seeds != DEFAULT_SEEDS:
        cmd += ["--seeds", *map(str, seeds)]
    return shlex.join(cmd)


def cell(r: dict, key: str, digits: int = 2) -> str:
    if r[key + "_min"] == r[key + "_max"]:
        return f"{r[key]:.{digits}f}"
    return f"{r[key]:.{digits}f} ({r[key + '_min']:.{digits}f}–{r[key + '_max']:.{digits}f})"


def machines(rows: dict[str, list[dict]]) -> str:
    """Which seeds ran where, and when (the sweep may span machines: accuracies do not depend on it, times do)."""
    where: dict[tuple[str, str], set[int]] = {}
    for rs in rows.values():
        for r in rs:
            where.setdefault((r.get("machine", "unknown"), r.get("date", "?")), set()).add(r["seed"])
    return "; ".join(f"seed {', '.join(map(str, sorted(s)))} on {m} ({d})" for (m, d), s in sorted(where.items(),
                                                                                              key=lambda kv: min(kv[1])))


def report(stats: list[dict], where: str, first: dict) -> str:
    base = next(r for r in stats if r["method"] == RANDOM)
    trained = sorted((r for r in stats if r["method"] != RANDOM), key=lambda r: -r["linear_top1"])
    seeds = sorted({s for r in stats for s in r["seeds"]})
    counts = sorted({len(r["seeds"]) for r in stats})
    lines = [
        f"Machines: {where}; torch {torch.__version__}. "
        f"Command (the whole sweep): `{sweep_command(first, seeds)}`; `--methods NAME …` re-runs rows, `--resume` "
        f"runs only the rows missing from `bench/results/methods_cifar10/seed*/`, `--report-only` rewrites this "
        f"section from them.",
        f"Data: CIFAR-10 (`{first['data']}`), training split {first['n_train']:,} images; k-NN bank / probe training set: "
        f"{first['bank']:,} class-balanced training images; test: {first['n_test']:,} images. Backbone: ResNet-18, "
        f"CIFAR stem, channels {first['channels']}; batch {first['batch']}; budget "
        f"**{first['budget_tflop']:g} TFLOP of training per method** (steps = budget / measured FLOPs per step). "
        f"Seeds {', '.join(map(str, seeds))} (initialisation, data order, augmentations): every figure is the "
        f"**median over {' or '.join(map(str, counts))} seeds, (min–max)** in brackets. Training time is CPU "
        f"seconds (wall seconds) per run, median over seeds; runs shared the cores with other work, so times are "
        f"upper bounds and the FLOP budget, not time, is what is held equal.",
        f"At this budget a method sees {min(r['epochs'] for r in trained):g}–{max(r['epochs'] for r in trained):g} "
        f"epochs: the table ranks how much each method learns per training FLOP early on, not converged accuracy "
        f"(the papers train for hundreds of epochs); multi-crop, 4-rotation batches and CPC's 49 patches an image buy "
        f"fewer steps, relative position's two 7-px patches an image many more.",
        "",
        "Pretext: the method's own task on the 10,000 test images (`Method.evaluate`, %; chance: rotation 25, "
        "relative position 12.5, jigsaw 1 (1 of its 100 permutations), CPC 0.016 (1 of the 6,272 patches of an "
        "evaluation batch of 128 images)); rows measured before the column existed show –.",
        "",
        "| method | seeds | GFLOP/step | steps | epochs | train CPU s (wall s) | pretext (held-out) | k-NN top-1 k=20 | "
        "k-NN top-1 k=200 | linear top-1 | Δ linear vs random |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in trained:
        lines.append(f"| {r['method']} | {len(r['seeds'])} | {r['gflop_per_step']} | {r['steps']} | {r['epochs']} | "
                     f"{r['train_cpu_s']:.0f} ({r['train_wall_s']:.0f}) | {pretext_cell(r)} | {cell(r, 'knn_top1_k20')} | "
                     f"{cell(r, 'knn_top1_k200')} | {cell(r, 'linear_top1')} | "
                     f"{r['linear_top1'] - base['linear_top1']:+.2f} |")
    lines.append(f"| *random init* | {len(base['seeds'])} | – | 0 | 0 | – | – | {cell(base, 'knn_top1_k20')} | "
                 f"{cell(base, 'knn_top1_k200')} | {cell(base, 'linear_top1')} | – |")
    lines += ["", f"![k-NN and linear-probe top-1 per method]({FIGURE.relative_to(REPO)})"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    p.add_argument("--methods", nargs="*", default=None, help="methods to (re)run; default: every image method")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
    p.add_argument("--budget-tflop", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, nargs=4, default=[16, 32, 64, 128])
    p.add_argument("--bank", type=int, default=10_000)
    p.add_argument("--resume", action="store_true", help="skip (method, seed) rows already in bench/results")
    p.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from bench/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sslhub").setLevel(logging.WARNING)
    command = shlex.join(["python", "bench/methods_cifar10.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:
        if not (Path(args.data) / "dataset.json").is_file():
            raise SystemExit(f"{args.data}: no CIFAR-10 there (needs ../shared/data/cifar10 or --data PATH)")
        train = decode_all(open_source(args.data, "train"), 32, num_workers=2, desc="decoding train")
        test = decode_all(open_source(args.data, "test"), 32, num_workers=2, desc="decoding test")
        idx = torch.from_numpy(balanced_subset(train.labels.numpy(), args.bank / len(train), seed=0))
        bank = DecodedImages(train.images[idx], train.labels[idx], [], train.classes, [])
        todo = args.methods if args.methods else [RANDOM, *image_methods()]
        for seed in args.seeds:  # seed-major: an interrupted sweep has whole seeds
            args.seed = seed
            for name in todo:
                path = RESULTS / f"seed{seed}" / f"{name.replace(' ', '_')}.json"
                if args.resume and path.is_file():
                    continue
                row = run_random(args, bank, test) if name == RANDOM else run_method(name, args, train, bank, test)
                row.update(n_train=len(train), n_test=len(test), bank=len(bank), budget_tflop=args.budget_tflop,
                           channels=args.channels, batch=args.batch, seed=seed, command=command, data=args.data,
                           machine=f"{cpu_name()}, {torch.get_num_threads()} threads",
                           date=datetime.date.today().isoformat())
                atomic_write_text(path, json.dumps(row, indent=1))
                log.info("seed %d %s: %s", seed, name,
                         {k: row[k] for k in ("knn_top1_k200", "linear_top1", "train_cpu_s")})
    rows = load_rows()
    stats = [summary(rs) for rs in rows.values()]
    first = rows[RANDOM][0]
    plot(stats, FIGURE)
    update_section(REPO / "BENCHMARKS.md", "methods_cifar10", "SSL methods on CIFAR-10 under one compute budget (issue 7)",
                   report(stats, machines(rows), first))
    print(json.dumps({r["method"]: r["linear_top1"] for r in stats}))


if __name__ == "__main__":
    main()
