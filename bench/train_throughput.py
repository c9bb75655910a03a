"""SimCLR training throughput: sslhub against lightly's documented pipeline, measured in the same run.

Both sides train the same thing — a ResNet-18 with the CIFAR stem, a 512-512-128 projection head,
NT-Xent, batch 256, two views per image from the same decoded CIFAR-10 images — and are timed end to
end (data → augmentation → forward → backward → optimiser step) over the same number of steps.

- sslhub: its trainer's path — index a uint8 batch, batched per-sample augmentation, one forward for
  both views, LARS.
- lightly (https://docs.lightly.ai, SimCLR example): ``SimCLRTransform`` per PIL image in a
  ``DataLoader`` (2 workers), torchvision ``resnet18`` with the CIFAR stem, ``SimCLRProjectionHead``,
  ``NTXentLoss``, SGD.

Also measured: the data pipeline alone (two views per image, images/s) and the share of the machine's
measured fp32 matmul peak that each side's training step achieves.

    python bench/train_throughput.py [--data ../shared/data/cifar10] [--runs 3] [--steps 3]
Writes bench/out/train_throughput.json and the table in BENCHMARKS.md (section between markers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import cpu_name, update_section  # noqa: E402
from sslhub.data.images import decode_all  # noqa: E402
from sslhub.data.sources import open_source  # noqa: E402
from sslhub.methods.base import Batch  # noqa: E402
from sslhub.methods.registry import get_method  # noqa: E402
from sslhub.models.backbone import Backbone  # noqa: E402
from sslhub.train.optim import build_optimizer  # noqa: E402
from sslhub.train.recipe import load_recipe  # noqa: E402

BATCH = 256


# ---------------------------------------------------------------------------------------- sslhub
def sslhub_setup(precision: str, channels_last: bool):
    r = load_recipe(REPO / "recipes/simclr_cifar10.yaml", ["method_args.proj_hidden_dim=512"])
    torch.manual_seed(0)
    method = get_method("simclr")(Backbone(r.encoder), r.method_args)
    if channels_last:
        method.to(memory_format=torch.channels_last)
        method.backbone.channels_last = True
    opt = build_optimizer([p for p in method.parameters()], r.optim, 1.0)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None
    return method, opt, ctx


def sslhub_steps(images: torch.Tensor, steps: int, precision: str, channels_last: bool) -> float:
    method, opt, ctx = sslhub_setup(precision, channels_last)
    n = images.shape[0]

    def one(step: int):
        g = torch.Generator().manual_seed(step)
        idx = torch.randperm(n, generator=g)[:BATCH]
        batch = Batch(images[idx], rng=g, step=step)
        if ctx:
            with ctx():
                loss = method.loss(batch)["loss"]
        else:
            loss = method.loss(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one(-1)  # warm-up
    t = time.perf_counter()
    for s in range(steps):
        one(s)
    return steps * BATCH / (time.perf_counter() - t)


def sslhub_data_only(images: torch.Tensor, steps: int) -> float:
    method, _, _ = sslhub_setup("fp32", False)
    aug = method.augment
    t = time.perf_counter()
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x = images[torch.randperm(images.shape[0], generator=g)[:BATCH]]
        aug(x, g), aug(x, g)
    return steps * BATCH / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------- lightly
class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), 0


def lightly_setup(images_hwc: np.ndarray, precision: str, channels_last: bool, workers: int):
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms.simclr_transform import SimCLRTransform

    transform = SimCLRTransform(input_size=32, gaussian_blur=0.0)  # lightly's CIFAR-10 settings
    loader = torch.utils.data.DataLoader(_PILDataset(images_hwc, transform), batch_size=BATCH, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    resnet.maxpool = nn.Identity()
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    head = SimCLRProjectionHead(512, 512, 128)
    model = nn.Sequential(backbone, nn.Flatten(), head)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return loader, model, NTXentLoss(), torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)


def lightly_steps(images_hwc: np.ndarray, steps: int, precision: str, channels_last: bool, workers: int) -> float:
    loader, model, criterion, opt = lightly_setup(images_hwc, precision, channels_last, workers)
    it = iter(loader)

    def one():
        (x0, x1), _ = next(it)
        if channels_last:
            x0, x1 = x0.contiguous(memory_format=torch.channels_last), x1.contiguous(memory_format=torch.channels_last)
        if precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = criterion(model(x0).float(), model(x1).float())
        else:
            loss = criterion(model(x0), model(x1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()  # warm-up (also starts the workers)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * BATCH / (time.perf_counter() - t)


def lightly_data_only(images_hwc: np.ndarray, steps: int, workers: int) -> float:
    loader, *_ = lightly_setup(images_hwc, "fp32", False, workers)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * BATCH / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------- machine
def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best / 1e9  # GFLOP/s


def step_flops_per_image() -> float:
    """FLOPs of one SimCLR training step (both views, forward + backward) per input image."""
    method, _, _ = sslhub_setup("fp32", False)
    x = torch.rand(8, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        h = method.backbone(torch.cat([x, x]))
        z = F.normalize(method.projector(h), dim=1)
        z.sum().backward()
    return fc.get_total_flops() / 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10"))
    ap.add_argument("--images", type=int, default=5000, help="decoded CIFAR-10 train images to sample from")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--workers", type=int, default=2, help="lightly DataLoader workers")
    ap.add_argument("--cases", nargs="+", default=["fp32", "fp32-cl", "bf16-cl"],
                    help="precision, '-cl' = channels-last")
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = open_source(args.data if Path(args.data).exists() else REPO / "data/cifar10-sample", "train")
    src.samples = src.samples[: args.images]
    images = decode_all(src, 32, progress=False).images  # (N, 3, 32, 32) uint8
    images_hwc = images.permute(0, 2, 3, 1).contiguous().numpy()

    peak = matmul_peak()
    flops = step_flops_per_image()
    results = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}", "matmul_peak_gflops": round(peak, 1),
               "step_gflop_per_image": round(flops / 1e9, 3), "batch": BATCH, "runs": args.runs,
               "steps": args.steps, "data": str(src.spec), "rows": []}
    cases = [(c.split("-")[0], c.endswith("-cl")) for c in args.cases]
    for precision, cl in cases:
        ours, theirs = [], []
        for run in range(args.runs):
            ours.append(sslhub_steps(images, args.steps, precision, cl))
            theirs.append(lightly_steps(images_hwc, args.steps, precision, cl, args.workers))
            print(f"{precision} channels_last={cl} run {run}: sslhub {ours[-1]:.1f} img/s, lightly {theirs[-1]:.1f}",
                  flush=True)
        o, t = statistics.median(ours), statistics.median(theirs)
        results["rows"].append({"what": f"end to end, {precision}{', channels-last' if cl else ''}",
                                "sslhub": round(o, 1), "lightly": round(t, 1), "ratio": round(o / t, 2),
                                "sslhub_peak_frac": round(o * flops / 1e9 / peak, 3),
                                "lightly_peak_frac": round(t * flops / 1e9 / peak, 3)})
    ours = [sslhub_data_only(images, 10) for _ in range(args.runs)]
    theirs = [lightly_data_only(images_hwc, 10, args.workers) for _ in range(args.runs)]
    o, t = statistics.median(ours), statistics.median(theirs)
    results["rows"].append({"what": "data pipeline alone (2 views)", "sslhub": round(o, 1), "lightly": round(t, 1),
                            "ratio": round(o / t, 2)})
    out = REPO / "bench/out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(results, indent=1))
    lines = [f"Machine: {results['machine']}; measured fp32 matmul peak {results['matmul_peak_gflops']} GFLOP/s; "
             f"one SimCLR step costs {results['step_gflop_per_image']} GFLOP per image (both views, fwd+bwd).",
             f"Command: `python bench/train_throughput.py --runs {args.runs} --steps {args.steps} "
             f"--cases {' '.join(args.cases)}`; data "
             f"`{results['data']}`; batch {BATCH}; median of {args.runs} runs, each {args.steps} timed steps "
             "after a warm-up step; both peers measured in the same run.", "",
             "| what | sslhub img/s | lightly img/s | sslhub / lightly | share of matmul peak (sslhub / lightly) |",
             "|---|---|---|---|---|"]
    for r in results["rows"]:
        frac = f"{r['sslhub_peak_frac']:.0%} / {r['lightly_peak_frac']:.0%}" if "sslhub_peak_frac" in r else "–"
        lines.append(f"| {r['what']} | {r['sslhub']} | {r['lightly']} | {r['ratio']}× | {frac} |")
    update_section(REPO / "BENCHMARKS.md", "train_throughput", "SimCLR training throughput (issue 2)", "\n".join(lines))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
