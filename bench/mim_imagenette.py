"""ViT methods on Imagenette-96 under one compute budget, and a MAE masking ablation (MAE paper, Table 1).

Two experiments, each run through the real trainer from the recipes in ``recipes/`` (ViT-Tiny/8, 6 blocks,
64 px) on the full Imagenette-96 training split, with the budget rules of ``bench/methods_cifar10.py``: a FLOP
budget (``--budget-tflop``) divided by the measured FLOPs of one training step (``torch.utils.flop_counter``,
forward + backward at the bench batch) gives each run's number of steps; epoch-denominated schedules keep their
share of the run.

* ``--experiment table``: MAE, SimMIM, DINO (ViT) and MoCo v3 (ViT) rows, and the same ViT at random init.
* ``--experiment ablation``: MAE with masking ratio 0.25 / 0.5 / 0.75 / 0.9 (random masking) and block masking
  at 0.75 — under the one FLOP budget a higher ratio is a cheaper step, so it buys more steps (as in the paper,
  where the encoder's cost falls with the ratio).

Evaluation of each export, loaded with ``sslhub.load_encoder`` as a user would: k-NN (k = 20, τ = 0.07) and a
logistic-regression linear probe on L2-normalised features (bank: the whole training split, queries: the whole
val split), and fine-tuning (``sslhub.eval.finetune``: AdamW, layer decay 0.75, cosine, MAE's near-zero head
init) on a class-balanced ``--ft-images`` subset of the training split for ``--ft-epochs``, top-1 on val.

    python bench/mim_imagenette.py --experiment table --seeds 0 1
    python bench/mim_imagenette.py --experiment ablation --seeds 0 1
    python bench/mim_imagenette.py --report-only
Writes bench/results/mim_imagenette/<experiment>/seed<N>/<row>.json (kept in git), the sections
``mim_imagenette`` and ``mae_ablation`` of BENCHMARKS.md and bench/figures/mae_ablation.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench.methods_cifar10 as cifar  # noqa: E402
from bench.methods_cifar10 import PreloadedTrainer, cpu_seconds  # noqa: E402
from bench.report import cpu_name, update_section  # noqa: E402
from sslhub import load_encoder  # noqa: E402
from sslhub.atomic import atomic_write_text  # noqa: E402
from sslhub.data.images import DecodedImages, decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.eval.finetune import finetune  # noqa: E402
from sslhub.eval.linear import balanced_subset  # noqa: E402
from sslhub.models.backbone import Backbone  # noqa: E402
from sslhub.publish.export import export_encoder  # noqa: E402
from sslhub.train.recipe import load_recipe  # noqa: E402

OUT = REPO / "bench/out/mim_imagenette"
RESULTS = REPO / "bench/results/mim_imagenette"
FIGURE = REPO / "bench/figures/mae_ablation.png"
RANDOM = "random init"
log = logging.getLogger("bench.mim")

# row name → (recipe, overrides)
TABLE = {"mae": ("mae_imagenette", []), "simmim": ("simmim_imagenette", []),
         "dino (ViT)": ("dino_vit_imagenette", []), "moco_v3 (ViT)": ("moco_v3_vit_imagenette", [])}
ABLATION = {f"random {r}": ("mae_imagenette", [f"method_args.mask_ratio={r}", "method_args.masking=random"])
            for r in (0.25, 0.5, 0.75, 0.9)}
ABLATION["block 0.75"] = ("mae_imagenette", ["method_args.mask_ratio=0.75", "method_args.masking=block"])
METRICS = ("finetune_top1", "knn_top1_k20", "linear_top1")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name).strip("_")


def base_overrides(args) -> list[str]:
    return [f"data.batch_size={args.batch}", "data.num_workers=0", "eval.knn.test=", "train.log_every=10",
            "train.ckpt_every=100000", "train.precision=fp32", f"seed={args.seed}", f"data.train={args.data}"]


def evaluate(export: Path, train: DecodedImages, test: DecodedImages, args) -> dict:
    """The CIFAR-10 table's k-NN and linear probe (bank = all of train), and fine-tuning on a balanced subset."""
    enc = load_encoder(export)
    frozen = cifar.evaluate(export, train, test, enc)
    idx = torch.from_numpy(balanced_subset(train.labels.numpy(), args.ft_images / len(train), seed=0))
    sub = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx],
                              keys=[train.keys[i] for i in idx.tolist()])
    t0 = time.perf_counter()
    fine = finetune(enc.model, sub, test, epochs=args.ft_epochs, lr=args.ft_lr, layer_decay=0.75, warmup_epochs=1,
                    seed=args.seed, progress=False)
    return {"knn_top1_k20": frozen["knn_top1_k20"], "linear_top1": frozen["linear_top1"],
            "finetune_top1": fine["top1"], "finetune_s": round(time.perf_counter() - t0, 1)}


def run_row(name: str, recipe: str, extra: list[str], args, train: DecodedImages, test: DecodedImages) -> dict:
    over = base_overrides(args) + extra
    if name == RANDOM:
        r = load_recipe(REPO / "recipes" / f"{recipe}.yaml", over)
        torch.manual_seed(args.seed)
        folder = export_encoder(Backbone(r.encoder), OUT / args.experiment / f"seed{args.seed}" / "random" / "export",
                                {"method": "none (random init)"})
        return {"row": name, "gflop_per_step": 0, "steps": 0, "epochs": 0, "train_cpu_s": 0, "train_wall_s": 0,
                **evaluate(folder, train, test, args)}
    path = REPO / "recipes" / f"{recipe}.yaml"
    flops = cifar.step_flops("", over, args.batch, path)
    steps = max(1, int(args.budget_tflop * 1e12 // flops))
    run_epochs = steps / (len(train) // args.batch)
    over += cifar.scaled_schedules("", over, run_epochs, path) + [f"train.max_steps={steps}"]
    recipe_obj = load_recipe(path, over)
    run_dir = OUT / args.experiment / f"seed{args.seed}" / slug(name)
    done = run_dir / "metrics.json"
    if args.reuse and done.is_file() and json.loads(done.read_text()).get("steps") == steps \
            and json.loads((run_dir / "recipe.json").read_text()) == recipe_obj.to_dict():
        # the same run was trained before (same recipe, same steps): evaluate its export again
        log.info("%s: reusing %s (%d steps)", name, run_dir, steps)
        old = json.loads(args.previous.get(name, "{}"))
        result = {"export": str(run_dir / "export"), **json.loads(done.read_text())}
        wall, cpu = old.get("train_wall_s", float("nan")), old.get("train_cpu_s", float("nan"))
    else:
        log.info("%s: %.1f GFLOP/step → %d steps (%.2f epochs)", name, flops / 1e9, steps, run_epochs)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        result = PreloadedTrainer(recipe_obj, run_dir, train).fit()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"row": name, "method": recipe_obj.method, "recipe": f"recipes/{recipe}.yaml",
            "gflop_per_step": round(flops / 1e9, 2), "steps": steps, "epochs": round(run_epochs, 3),
            "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "overrides": over,
            "pretext": result.get("pretext", {}), **evaluate(Path(result["export"]), train, test, args)}


# ------------------------------------------------------------------------------------------- report
def load_rows(experiment: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for d in sorted((RESULTS / experiment).glob("seed*"), key=lambda d: int(d.name[4:])):
        for f in sorted(d.glob("*.json")):
            r = json.loads(f.read_text())
            rows.setdefault(r["row"], []).append(r)
    return rows


def med(rs: list[dict], key: str) -> str:
    v = np.array([r[key] for r in rs], dtype=float)
    m = float(np.median(v))
    return f"{m:.2f}" if v.min() == v.max() else f"{m:.2f} ({v.min():.2f}–{v.max():.2f})"


def setting(rows: dict[str, list[dict]]) -> dict:
    first = next(iter(rows.values()))[0]
    return {k: first[k] for k in ("budget_tflop", "batch", "n_train", "n_test", "ft_images", "ft_epochs", "ft_lr",
                                  "data", "machine", "date")}


def table_md(rows: dict[str, list[dict]], order: list[str], label: str) -> str:
    s = setting(rows)
    seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
    lines = [
        f"Machine: {s['machine']}; torch {torch.__version__}. Data: Imagenette-96 (`{s['data']}`), train "
        f"{s['n_train']:,} images, val {s['n_test']:,}. Encoder: ViT-Tiny/8 with 6 blocks at 64 px "
        f"(`vit_tiny_patch16_224`, patch_size 8, depth 6; 64 patches); batch {s['batch']}; budget "
        f"**{s['budget_tflop']:g} TFLOP of training per row** (steps = budget / measured FLOPs per step). "
        f"Seeds {', '.join(map(str, seeds))}; every figure is the **median over seeds (min–max)**. "
        f"k-NN (k = 20) and linear probe: frozen features, bank = the whole train split, queries = val. Fine-tune: "
        f"all layers, {s['ft_images']:,} class-balanced training images, {s['ft_epochs']:g} epochs, AdamW lr "
        f"{s['ft_lr']:g}, layer decay 0.75, top-1 on val.",
        "",
        f"| {label} | seeds | GFLOP/step | steps | epochs | train CPU s | fine-tune top-1 | k-NN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        if name not in rows:
            continue
        rs = rows[name]
        r = rs[0]
        shown = f"*{name}*" if name == RANDOM else name
        cpus = [x["train_cpu_s"] for x in rs if x["train_cpu_s"] == x["train_cpu_s"]]  # NaN: re-evaluated run
        cpu = f"{np.median(cpus):.0f}" if r["steps"] and cpus else "–"
        lines.append(f"| {shown} | {len(rs)} | {r['gflop_per_step'] or '–'} | {r['steps']} | {r['epochs']} | {cpu} | "
                     f"{med(rs, 'finetune_top1')} | {med(rs, 'knn_top1_k20')} | {med(rs, 'linear_top1')} |")
    return "\n".join(lines)


def plot_ablation(rows: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [0.25, 0.5, 0.75, 0.9]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in zip(axes, ("finetune_top1", "knn_top1_k20"), ("fine-tune top-1", "k-NN top-1 (k=20)")):
        xs = [r for r in ratios if f"random {r}" in rows]
        ys = [np.median([x[key] for x in rows[f"random {r}"]]) for r in xs]
        lo = [min(x[key] for x in rows[f"random {r}"]) for r in xs]
        hi = [max(x[key] for x in rows[f"random {r}"]) for r in xs]
        ax.errorbar(xs, ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)], marker="o", capsize=3, label="random")
        if "block 0.75" in rows:
            b = [x[key] for x in rows["block 0.75"]]
            ax.plot([0.75], [np.median(b)], "s", color="#DD8452", label="block")
        ax.set_xlabel("masking ratio")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Imagenette val top-1 (%)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=130)
    plt.close(fig)


def command(rows: dict[str, list[dict]], experiment: str) -> str:
    """The command that reruns ``experiment`` with the settings its rows were measured with."""
    s = setting(rows)
    seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
    cmd = f"python bench/mim_imagenette.py --experiment {experiment} --seeds {' '.join(map(str, seeds))}"
    defaults = {"budget_tflop": 16.0, "batch": 128, "ft_images": 2000, "ft_epochs": 3, "ft_lr": 3e-3}
    for k, d in defaults.items():
        if s[k] != d:
            cmd += f" --{k.replace('_', '-')} {s[k]:g}"
    return f"Command: `{cmd}` (add `--threads 1` to run two experiments side by side; `--report-only` rewrites " \
           "this section from bench/results/mim_imagenette)."


def report() -> None:
    rows = load_rows("table")
    if rows:
        body = table_md(rows, [*TABLE, RANDOM], "method")
        update_section(REPO / "BENCHMARKS.md", "mim_imagenette",
                       "ViT methods on Imagenette-96 under one compute budget (issue 15)",
                       body + "\n\n" + command(rows, "table"))
    rows = load_rows("ablation")
    if rows:
        plot_ablation(rows)
        body = table_md(rows, list(ABLATION), "MAE masking")
        update_section(REPO / "BENCHMARKS.md", "mae_ablation", "MAE masking ablation on Imagenette-96 (issue 15)",
                       body + f"\n\n![MAE masking ablation]({FIGURE.relative_to(REPO)})\n\n" + command(rows, "ablation"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=["table", "ablation"], default="table")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/imagenette96"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="*", default=None, help="only these rows (names as in the table)")
    p.add_argument("--budget-tflop", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ft-images", type=int, default=2000)
    p.add_argument("--ft-epochs", type=float, default=3)
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="skip rows already measured")
    p.add_argument("--reuse", action="store_true", help="re-evaluate runs already trained with the same recipe and "
                   "steps (under bench/out) instead of training them again")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report_only:
        if not (Path(args.data) / "dataset.json").is_file():
            raise SystemExit(f"{args.data}: no Imagenette-96 there (needs ../shared/data/imagenette96 or --data PATH)")
        train = decode_all(open_source(args.data, "train"), 64, num_workers=2, desc="decoding train")
        test = decode_all(open_source(args.data, "val"), 64, num_workers=2, desc="decoding val")
        rows = {**TABLE, RANDOM: ("mae_imagenette", [])} if args.experiment == "table" else ABLATION
        todo = [n for n in rows if args.rows is None or n in args.rows]
        for seed in args.seeds:
            args.seed = seed
            for name in todo:
                path = RESULTS / args.experiment / f"seed{seed}" / f"{slug(name)}.json"
                if args.resume and path.is_file():
                    continue
                recipe, extra = rows[name]
                args.previous = {name: path.read_text()} if path.is_file() else {}
                row = run_row(name, recipe, extra, args, train, test)
                row.update(seed=seed, experiment=args.experiment, budget_tflop=args.budget_tflop, batch=args.batch,
                           n_train=len(train), n_test=len(test), ft_images=args.ft_images, ft_epochs=args.ft_epochs,
                           ft_lr=args.ft_lr, data=args.data, threads=torch.get_num_threads(),
                           machine=f"{cpu_name()}, {torch.get_num_threads()} thread(s)",
                           date=datetime.date.today().isoformat())
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(row, indent=1) + "\n")
                log.info("%s seed %d: %s", name, seed, {k: row[k] for k in METRICS})
    report()


if __name__ == "__main__":
    main()
