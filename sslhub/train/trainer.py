"""The trainer: recipe → steps → checkpoints → evaluation → export, in one process or many.

Everything a step does is a function of (checkpointed state, step number): the batch comes from a
seeded per-epoch permutation (``BatchPlan``) and every random number from a generator seeded with
``(seed, step, rank)``.  So ``--resume`` after a crash, even a SIGKILL, ends with the same weights as
an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import sslhub.distributed as D
from sslhub import formats
from sslhub.data.images import BatchPlan, DecodedImages, decode_all
from sslhub.data.sources import open_source, with_captions
from sslhub.eval import protocols
from sslhub.eval.knn import extract_features, knn_eval
from sslhub.inference.load import load_encoder
from sslhub.methods.base import Batch, Method
from sslhub.methods.registry import get_method
from sslhub.models.backbone import Backbone
from sslhub.schedules import cosine_schedule
from sslhub.train.checkpoint import load_state, save_state
from sslhub.train.optim import build_optimizer, scaled_lr
from sslhub.train.plots import plot_curves
from sslhub.train.recipe import Recipe

log = logging.getLogger("sslhub.train")


class NonFiniteLoss(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, resume: bool = False, progress: bool = True):
        self.recipe, self.out, self.resume = recipe, Path(out_dir), resume
        self.progress = progress
        tc = recipe.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = pick_device(tc.device)
        D.init_from_env(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.ckpt_path = self.out / "checkpoints" / "last.safetensors"
        if D.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / formats.RUN_RECIPE).write_text(json.dumps(recipe.to_dict(), indent=1))

    # ------------------------------------------------------------------ setup
    def _data(self) -> DecodedImages:
        dc, enc = self.recipe.data, self.recipe.encoder
        source = open_source(dc.train, dc.split)
        if get_method(self.recipe.method).needs_text:
            source = with_captions(source)  # samples without a caption are skipped and counted
        return decode_all(source, enc.image_size, num_workers=dc.num_workers,
                          progress=self.progress and D.is_main(), desc="decoding train")

    def _model(self) -> Method:
        torch.manual_seed(self.recipe.seed)
        method = get_method(self.recipe.method).create(self.recipe.encoder, self.recipe.method_args)
        if self.world > 1:
            method.convert_batchnorm()  # global BN: statistics of the whole batch, as one process
        method.to(self.device)
        if self.recipe.train.channels_last:
            method.to(memory_format=torch.channels_last)
            method.backbone.channels_last = True
        D.broadcast_module(method)
        return method

    def _autocast(self):
        if self.recipe.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        r, tc = self.recipe, self.recipe.train
        data = self._data()
        plan = BatchPlan(len(data), r.data.batch_size, r.seed, self.rank, self.world)
        total = tc.max_steps if tc.max_steps is not None else max(1, int(tc.epochs * plan.steps_per_epoch))
        method = self._model()
        method.configure(plan.steps_per_epoch, total)
        groups = method.optim_groups()
        lr = scaled_lr(r.optim, r.data.batch_size * tc.accumulate)
        optimizers = {k: build_optimizer(ps, r.optim, lr) for k, ps in groups.items()}
        warmup = int(r.optim.warmup_epochs * plan.steps_per_epoch)
        lrs = cosine_schedule(lr, lr * r.optim.min_lr_ratio, total, warmup)
        start, elapsed = 0, 0.0
        if D.is_main() and self.ckpt_path.parent.is_dir():  # temp files of a write that was cut short
            for stale in self.ckpt_path.parent.glob(f".{self.ckpt_path.name}.*.tmp"):
                stale.unlink()
        if self.resume and self.ckpt_path.is_file():
            state = load_state(self.ckpt_path)
            method.load_state_dict(state["model"])
            for k, opt in optimizers.items():
                opt.load_state_dict(state["optim"][k])
            start, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
            log.info("resumed from %s at step %d/%d", self.ckpt_path, start, total)
        elif self.resume:
            log.info("--resume: no checkpoint at %s, starting from scratch", self.ckpt_path)
        metrics_log = MetricsLog(self.out, start, enabled=D.is_main())
        params = [p for p in method.parameters() if p.requires_grad]
        micro = r.data.batch_size // self.world
        if micro % tc.accumulate:
            raise ValueError(f"per-process batch {micro} is not divisible by train.accumulate={tc.accumulate}")
        bar = tqdm(total=total, initial=start, desc=f"{r.method}", unit="step",
                   disable=not (self.progress and D.is_main()), dynamic_ncols=True)
        method.train()
        t_last, n_since = time.perf_counter(), 0
        for step in range(start, total):
            for opt in optimizers.values():
                for g in opt.param_groups:
                    g["lr"] = float(lrs[step])
            seed = step_seed(r.seed, step, self.rank)
            torch.manual_seed(seed)
            rng = torch.Generator(device="cpu").manual_seed(seed)
            idx = plan.indices(step)
            images, labels = data.images[idx], data.labels[idx]
            texts = pick_captions(data.texts, idx, rng) if data.texts is not None else None
            out_sum: dict[str, float] = {}
            for chunk in range(tc.accumulate):
                sl = slice(chunk * micro // tc.accumulate, (chunk + 1) * micro // tc.accumulate)
                batch = Batch(images[sl].to(self.device), labels[sl].to(self.device),
                              texts=texts[sl] if texts is not None else None, rng=rng, step=step)
                with self._autocast():
                    out = method.loss(batch)
                loss = out["loss"]
                if not math.isfinite(loss.item()):
                    bar.close()
                    raise NonFiniteLoss(
                        f"loss is {loss.item()} at step {step}: training stopped. The last good checkpoint is "
                        f"{self.ckpt_path if self.ckpt_path.exists() else 'not written yet'}; lower optim.lr or "
                        f"use train.precision=fp32, then run again with --resume")
                self._backward(out, groups, tc.accumulate)
                for k, v in out.items():
                    out_sum[k] = out_sum.get(k, 0.0) + float(v.detach()) / tc.accumulate
            D.average_gradients(params)
            if r.optim.clip_grad:
                nn.utils.clip_grad_norm_(params, r.optim.clip_grad)
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            method.on_step_end(step, total)
            n_since += r.data.batch_size
            done = step + 1
            if done % tc.log_every == 0 or done == total:
                now = time.perf_counter()
                elapsed += now - t_last
                row = {"step": done, "epoch": done / plan.steps_per_epoch, "lr": float(lrs[step]), **out_sum,
                       "img_per_s": n_since / max(now - t_last, 1e-9)}
                metrics_log.write(row)
                bar.set_postfix(loss=f"{out_sum['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                t_last, n_since = now, 0
            bar.update(1)
            if done % tc.ckpt_every == 0 or done == total:
                self._save(method, optimizers, done, elapsed)
        bar.close()
        metrics_log.close()
        if D.is_main() and metrics_log.rows:
            plot_curves(metrics_log.path)
        return self._finish(method, data, total, elapsed)

    def _backward(self, out: dict[str, torch.Tensor], groups: dict[str, list[nn.Parameter]], accumulate: int) -> None:
        keys = list(groups)
        if len(keys) == 1:
            (out[keys[0]] / accumulate).backward()
            return
        for i, k in enumerate(keys):  # each loss only into its own optimiser's parameters
            (out[k] / accumulate).backward(inputs=groups[k], retain_graph=i < len(keys) - 1)

    def _save(self, method: Method, optimizers: dict, step: int, elapsed: float) -> None:
        if not D.is_main():
            return
        state = {"model": method.state_dict(), "optim": {k: o.state_dict() for k, o in optimizers.items()},
                 "step": step, "elapsed": elapsed, "recipe": json.dumps(self.recipe.to_dict())}
        save_state(self.ckpt_path, state)

    # ------------------------------------------------------------------ end
    def _finish(self, method: Method, data: DecodedImages, total: int, elapsed: float) -> dict[str, Any]:
        r = self.recipe
        metrics: dict[str, Any] = {}
        if D.is_main():
            method.eval()
            metrics = self.evaluate(method, data)
            info = {"method": r.method, "paper": method.paper, "recipe": r.to_dict(), "recipe_file": r.source,
                    "steps": total, "global_batch": r.data.batch_size * r.train.accumulate,
                    "processes": self.world, "train_data": r.data.train, "train_images": len(data),
                    "train_seconds": round(elapsed, 1)}
            export = method.export(self.out / "export", {**info, "eval": metrics})
            more = self.evaluate_export(export, knn=not isinstance(method.exported_backbone(), Backbone))
            if more:  # evaluations of the exported model itself: written into its config and card
                metrics.update(more)
                export = method.export(self.out / "export", {**info, "eval": metrics})
            (self.out / formats.RUN_METRICS_JSON).write_text(json.dumps({"steps": total, **metrics}, indent=1))
            metrics = {"export": str(export), "steps": total, **metrics}
        D.barrier()
        return metrics

    def evaluate(self, method: Method, data: DecodedImages) -> dict[str, Any]:
        r, enc = self.recipe, self.recipe.encoder
        kc, results = r.eval.knn, {}
        test = None
        backbone = method.exported_backbone()
        if kc.test and isinstance(backbone, Backbone):
            test = decode_all(open_source(kc.test, kc.test_split), enc.image_size, r.data.num_workers,
                              progress=self.progress, desc="decoding test")
            same_bank = kc.train in ("", r.data.train) and kc.train_split == r.data.split
            bank = data if same_bank else decode_all(open_source(kc.train, kc.train_split), enc.image_size,
                                                     r.data.num_workers, progress=self.progress, desc="decoding bank")
            feats = [extract_features(backbone, d.images, device=self.device, progress=self.progress,
                                      desc=f"k-NN {name}") for name, d in (("bank", bank), ("queries", test))]
            results["knn"] = knn_eval(feats[0], bank.labels, feats[1], test.labels, ks=kc.k,
                                      temperature=kc.temperature)
            results["knn"]["bank"] = kc.train or r.data.train
            results["knn"]["test"] = kc.test
        if r.eval.pretext and test is not None:
            with self._autocast():
                pretext = method.evaluate(test.images, test.labels)
            if pretext:
                results["pretext"] = pretext
        return results


    def evaluate_export(self, export: Path, knn: bool) -> dict[str, Any]:
        """Evaluations through the inference layer on the export, as a user would load it: zero-shot and
        retrieval (image–text models), and k-NN for methods whose encoder is not a timm backbone."""
        ev, kc, out = self.recipe.eval, self.recipe.eval.knn, {}
        if not (ev.zeroshot or ev.retrieval.data or (knn and kc.test)):
            return out
        enc = load_encoder(export, device=self.device)
        workers = self.recipe.data.num_workers
        if knn and kc.test:
            out["knn"] = protocols.knn(enc, kc.train or self.recipe.data.train, kc.train_split, kc.test,
                                       kc.test_split, kc.k, kc.temperature, workers, self.progress)
        for z in ev.zeroshot:
            res = protocols.zeroshot(enc, z.data, z.split, z.templates, list(z.classes) or None, workers,
                                     self.progress)
            pairs = res.pop("prompt_check")  # the card keeps the count and the closest pairs only
            res["confusable_label_pairs"] = {"count": len(pairs), "closest": [
                {"labels": list(p["labels"]), "similarity": p["similarity"]} for p in pairs[:3]]}
            out.setdefault("zeroshot", []).append(res)
        if ev.retrieval.data:
            out["retrieval"] = protocols.retrieval(enc, ev.retrieval.data, ev.retrieval.split, ev.retrieval.k,
                                                   workers, self.progress)
        return out


def pick_captions(texts: list[list[str]], idx: torch.Tensor, rng: torch.Generator) -> list[str]:
    """One of each image's captions, drawn with the step's generator (deterministic on resume)."""
    draws = torch.randint(0, 2**31 - 1, (len(idx),), generator=rng).tolist()
    return [texts[i][d % len(texts[i])] for i, d in zip(idx.tolist(), draws)]


class MetricsLog:
    """metrics.csv (+ TensorBoard when installed).  On resume, rows past the checkpoint are dropped."""

    def __init__(self, out: Path, start: int, enabled: bool = True):
        self.enabled = enabled
        self.path = out / formats.RUN_METRICS_CSV
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path) as f:
                self.rows = [row for row in csv.DictReader(f) if int(float(row["step"])) <= start]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
        except ImportError:  # tensorboard is an optional extra
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        if keys == getattr(self, "_keys", None):  # same columns: append the row
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, keys).writerow(row)
        else:  # first row, a resumed file or a new column: write it whole
            self._keys = keys
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows(self.rows)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", float(v), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe``; returns the evaluation metrics and the export folder (on rank 0)."""
    return Trainer(recipe, out_dir, resume, progress).fit()


__all__ = ["Trainer", "train", "NonFiniteLoss"]
