"""The trainer: recipe → steps → checkpoints → export with its evaluation, in one process or many.

    fit():  setup()      data, batch plan, method, optimisers, learning-rate schedule
            restore()    --resume: weights, optimisers and step from the last checkpoint
            for step:    train_step(step) → log(step) → checkpoint(step)
            finish()     training curves; export written once, evaluated on the folder as users load it

Everything a step does is a function of (checkpointed state, step number): the batch comes from a
seeded per-epoch permutation (``BatchPlan``) and every random number from a generator seeded with
``(seed, step, rank)``.  So ``--resume`` after a crash, even a SIGKILL, ends with the same weights as
an uninterrupted run.  The first Ctrl-C stops after the current step and saves a checkpoint to resume from.

Guards: a non-finite loss or gradient stops training before the step is applied, and a checkpoint is never
written with a non-finite tensor.  Each checkpoint records its loss and weight norm; one whose weights grew
``DIVERGED``× beyond their start is *diverging*.  The error names the newest healthy checkpoint (finite, not
diverging) with a command that continues from it at a lower learning rate, and ``--resume`` itself passes
over damaged (checksum) and diverging checkpoints, moving them to ``checkpoints/rejected/``.

Batches: ``data.batch_size`` images (over all processes) go through the network at once; with
``train.accumulate = A`` an optimiser step averages the gradients of A such micro-batches, so a step sees
``batch_size × A`` images (the batch the learning rate is scaled for and the card reports).  Methods
change their state only in ``on_step_end``, after the step, so every micro-batch sees the same state.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import sslhub.distributed as D
from sslhub import formats
from sslhub.atomic import atomic_write_bytes
from sslhub.data.images import BatchPlan, DecodedImages, decode_all
from sslhub.data.sources import DataError, has_split, list_shards, open_source, with_captions
from sslhub.data.stream import (StreamLoader, StreamPlan, decoded_mb, listed_size, memory_limit_mb,
                                positions_from, shard_counts)
from sslhub.errors import SslhubError
from sslhub.eval import protocols
from sslhub.inference.load import load_encoder
from sslhub.methods.base import Batch, Method
from sslhub.methods.registry import get_method
from sslhub.schedules import cosine_schedule
from sslhub.train.checkpoint import checkpoint_path, iter_infos, list_checkpoints, prune, save_state
from sslhub.train.guard import NonFiniteLoss, TrainingInterrupted, deferred_interrupt, health, non_finite, weight_norm
from sslhub.train.metrics_log import MetricsLog, plot_curves
from sslhub.train.optim import build_optimizer, scaled_lr
from sslhub.train.parallel import Parallel
from sslhub.train.recipe import Recipe
from sslhub.train.run_folder import check_run_folder, clear_run_folder, newest_usable, reject
from sslhub.train.step import accumulate_gradients, apply_update, check_groups, pick_captions, pick_device, step_seed

log = logging.getLogger("sslhub.train")


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 overwrite: bool = False):
        self.recipe, self.out, self.resume, self.progress = recipe, Path(out_dir), resume, progress
        self.overwrite = overwrite
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.device = pick_device(recipe.train.device)
        D.init_from_env(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.ckpt_dir = self.out / formats.RUN_CHECKPOINTS
        self.start, self.elapsed, self.last_loss = 0, 0.0, float("nan")
        self.data: DecodedImages | None = None  # data.cache=memory: the decoded training set
        self.stream: StreamLoader | None = None  # data.cache=stream: this process's lanes (made after restore)
        self.positions: dict[int, tuple[int, int]] = {}  # stream: each lane's position in the checkpoint resumed

    def fit(self) -> dict[str, Any]:
        self.setup()
        self.restore()
        bar = tqdm(total=self.total, initial=self.start, desc=self.recipe.method, unit="step",
                   disable=not (self.progress and D.is_main()), dynamic_ncols=True)
        self.method.train()
        if isinstance(self.plan, StreamPlan):
            self.stream = StreamLoader(self.plan, self.rank, self.world, self.recipe.data.num_workers, self.start,
                                       self.total, self.positions, texts=self.needs_text)
        self._t_last, self._n_since = time.perf_counter(), 0
        try:
            with deferred_interrupt() as interrupt:
                for step in range(self.start, self.total):
                    logged = self.train_step(step)
                    self.log(step, logged, bar)
                    self.checkpoint(step + 1)
                    bar.update(1)
                    if self.stop_requested(interrupt["set"]) and step + 1 < self.total:
                        self.interrupted(step + 1)
        finally:
            bar.close()
            self.metrics_log.close()
            if self.stream is not None:
                self.stream.close()
        return self.finish()

    # ------------------------------------------------------------------ setup
    def load_data(self) -> None:
        """``data.cache``: decode the training set into memory (``self.data``) or plan its stream (``self.plan``)."""
        dc, size = self.recipe.data, self.recipe.encoder.image_size
        self.needs_text = get_method(self.recipe.method).needs_text
        shards, _ = list_shards(dc.train, dc.split)
        self._counts = None  # set by cache_mode when it had to count the shards
        mode = self.cache_mode(shards)
        if mode == "stream":
            counts = self._counts or shard_counts(shards, dc.split, dc.num_workers, self.progress and D.is_main())
            self.stream_plan = StreamPlan(shards, counts, self.lanes(len(shards)), self.step_batch, self.recipe.seed,
                                          dc.shuffle_buffer, dc.uneven, size, dc.split, dc.train)
            self.n_train = len(self.stream_plan)
            log.info("data.cache=%s: streaming %s", dc.cache, self.stream_plan.describe())
            return
        source = open_source(dc.train, dc.split)
        if self.needs_text:
            source = with_captions(source)  # samples without a caption are skipped and counted
        self.data = decode_all(source, size, num_workers=dc.num_workers, progress=self.progress and D.is_main(),
                               desc="decoding train")
        self.n_train = len(self.data)

    def cache_mode(self, shards: list) -> str:
        """``data.cache`` resolved, with the reason logged: ``auto`` → memory when the decoded images of every process
        on this machine fit in ``data.cache_limit_mb``, else stream; a resumed run keeps its checkpoint's choice."""
        dc, size = self.recipe.data, self.recipe.encoder.image_size
        if dc.cache == "stream" and not shards:
            raise DataError(f"data.cache=stream reads WebDataset shards, and {dc.train} is not shards (an image folder "
                            "or a CSV): use data.cache=memory, or write the images into .tar shards")
        if dc.cache != "auto":
            return dc.cache
        newest = next(iter_infos(self.ckpt_dir), None) if self.resume else None
        if newest is not None and newest[1].get("data_mode") in ("memory", "stream"):
            log.info("data.cache=auto: %s, as in %s (a resumed run keeps its order)", newest[1]["data_mode"], newest[0])
            return newest[1]["data_mode"]
        if not shards:
            log.info("data.cache=auto: memory (%s is not shards, which streaming reads)", dc.train)
            return "memory"
        n = listed_size(shards, dc.split)
        if n is None:
            self._counts = shard_counts(shards, dc.split, dc.num_workers, self.progress and D.is_main())
            n = sum(self._counts)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        need, limit = decoded_mb(n, size) * local, dc.cache_limit_mb or memory_limit_mb()
        mode = "memory" if need <= limit else "stream"
        log.info("data.cache=auto: %s (%s images decoded at %d px take %.0f MB × %d process(es) on this machine %s "
                 "data.cache_limit_mb=%.0f)", mode, f"{n:,}", size, need / local, local,
                 "≤" if mode == "memory" else ">", limit)
        return mode

    def lanes(self, n_shards: int) -> int:
        """``data.lanes``, or processes × workers (the largest multiple of the processes that fits the shards and
        divides the step's batch, when that does not)."""
        dc = self.recipe.data
        if dc.lanes is not None:
            return dc.lanes
        newest = next(iter_infos(self.ckpt_dir), None) if self.resume else None
        if newest is not None and isinstance(newest[1].get("data_lanes"), int):  # the order the run started with
            log.info("data.lanes: %d, as in %s", newest[1]["data_lanes"], newest[0])
            return newest[1]["data_lanes"]
        for k in range(self.world * max(1, dc.num_workers), 0, -self.world):
            if k <= n_shards and self.step_batch % k == 0:
                return k
        raise DataError(f"{dc.train}: {n_shards} shard(s) cannot feed {self.world} processes (each reads shards of "
                        "its own): write the data in more shards, run fewer processes or use data.cache=memory")

    def build_method(self) -> Method:
        r = self.recipe
        torch.manual_seed(r.seed)
        method = get_method(r.method).create(r.encoder, r.method_args)
        if self.world > 1:
            method.convert_batchnorm()  # global BN: statistics of the whole batch, as one process
        method.to(self.device)
        if r.train.channels_last:
            method.use_channels_last()
        D.broadcast_module(method)
        # train.parallel: DDP wraps a view of the method (self.method stays unwrapped: checkpoints, exports)
        self.parallel = Parallel.create(method, r.train.parallel, self.device)
        return method

    def setup(self) -> None:
        r, tc = self.recipe, self.recipe.train
        if r.data.batch_size % self.world:
            raise SslhubError(f"data.batch_size={r.data.batch_size} is not divisible by {self.world} processes")
        check_run_folder(self.out, r.to_dict(), self.resume, self.overwrite)
        self.method = self.build_method()  # before the data: a model that cannot be built fails at once
        self.step_batch = r.data.batch_size * tc.accumulate  # images per optimiser step, all processes
        self.load_data()
        D.barrier()  # every process has checked the run folder before the first process writes into it
        if D.is_main():  # nothing is written into the run folder before the recipe and the data are read
            if self.overwrite and not self.resume:
                clear_run_folder(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / formats.RUN_RECIPE).write_text(json.dumps(r.to_dict(), indent=1))
        self.plan = BatchPlan(len(self.data), self.step_batch, r.seed, self.rank, self.world) \
            if self.data is not None else self.stream_plan
        spe = self.plan.steps_per_epoch
        self.total = tc.max_steps if tc.max_steps is not None else max(1, int(tc.epochs * spe))
        self.method.configure(spe, self.total)
        if tc.accumulate > 1 and self.method.batch_coupled:
            log.warning("%s compares the samples of a batch with each other (in-batch negatives or batch "
                        "statistics): with train.accumulate=%d that batch is a micro-batch of %d images, not the %d "
                        "images of a step", r.method, tc.accumulate, r.data.batch_size, self.step_batch)
        self.groups = self.method.optim_groups()
        check_groups(self.method, self.groups)
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.weight_norm_start = weight_norm(self.params)  # replaced by the checkpoint's on --resume
        lr = scaled_lr(r.optim, self.step_batch)
        self.optimizers = {k: build_optimizer(ps, r.optim, lr) for k, ps in self.groups.items()}
        self.lrs = cosine_schedule(lr, lr * r.optim.min_lr_ratio, self.total, int(r.optim.warmup_epochs * spe))

    def restore(self) -> None:
        if D.is_main() and self.ckpt_dir.is_dir():  # temp files of a write that was cut short
            for stale in self.ckpt_dir.glob(".*.safetensors.*.tmp"):
                stale.unlink()
        if self.resume and list_checkpoints(self.ckpt_dir):
            path, state, passed = newest_usable(self.ckpt_dir)
            D.barrier()  # every process has read its checkpoint before any is moved
            if D.is_main():
                reject(self.out, passed)
            self.method.load_state_dict(state["model"])
            for k, opt in self.optimizers.items():
                opt.load_state_dict(state["optim"][k])
            self.start, self.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
            self.weight_norm_start = float(state.get("weight_norm_start") or self.weight_norm_start)
            if isinstance(self.plan, StreamPlan):
                self.positions = self.stream_positions(path, state)
            log.info("resumed from %s at step %d/%d", path, self.start, self.total)
        elif self.resume:
            log.info("--resume: no checkpoint in %s, starting from scratch", self.ckpt_dir)
        self.metrics_log = MetricsLog(self.out, self.start, enabled=D.is_main())

    def stream_positions(self, path: Path, state: dict) -> dict[int, tuple[int, int]]:
        """The lanes' positions saved in the checkpoint resumed, after checking the stream is the one it read."""
        saved = state.get("data") or {}
        if saved.get("fingerprint") != self.plan.fingerprint():
            raise DataError(f"{path} was written while streaming other data or another lane layout (data "
                            f"fingerprint {saved.get('fingerprint')} → {self.plan.fingerprint()}: shards, their sample "
                            f"counts, data.lanes={self.plan.lanes} or data.shuffle_buffer changed), so --resume cannot "
                            "continue its sample order: restore the data and settings, or start over with --overwrite")
        return positions_from(saved["positions"])

    # ------------------------------------------------------------------ step
    def step_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]] | None]:
        """This process's share of the step: images, labels and captions (or None), from memory or the stream."""
        if self.stream is not None:
            rows = self.stream.rows(step)
            self._first_images = getattr(self, "_first_images", rows.images[:8])
            return rows.images, rows.labels, rows.texts
        idx = self.plan.indices(step)  # (step_batch / world,)
        texts = [self.data.texts[i] for i in idx.tolist()] if self.data.texts is not None else None
        return self.data.images[idx], self.data.labels[idx], texts

    def micro_batches(self, step: int) -> list[Batch]:
        """This process's share of the step, cut into ``train.accumulate`` micro-batches."""
        seed = step_seed(self.recipe.seed, step, self.rank)
        torch.manual_seed(seed)
        rng = torch.Generator(device="cpu").manual_seed(seed)
        images, labels, captions = self.step_rows(step)  # step_batch / world rows
        n = images.shape[0]
        texts = pick_captions(captions, torch.arange(n), rng) if captions is not None else None
        micro = self.recipe.data.batch_size // self.world
        shared = step_seed(self.recipe.seed, step, -1)  # the same on every process (see Batch.seed)
        return [Batch(images[s : s + micro].to(self.device), labels[s : s + micro].to(self.device),
                      texts=texts[s : s + micro] if texts is not None else None, rng=rng, step=step,
                      seed=shared, offset=self.rank * n + s)
                for s in range(0, n, micro)]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.recipe.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> dict[str, float]:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = float(self.lrs[step])
        try:
            logged = accumulate_gradients(self.method, self.groups, self.micro_batches(step), self.autocast,
                                          self.parallel)
            apply_update(self.method, self.optimizers, self.params, step, self.total, self.recipe.optim.clip_grad,
                         self.parallel)
        except NonFiniteLoss as e:
            raise self.diverged(str(e)) from None
        self.last_loss = logged["loss"]
        return logged

    def diverged(self, what: str) -> NonFiniteLoss:
        """The guard's error: what went wrong, the newest healthy checkpoint and a command that continues from it
        at a tenth of the learning rate (``--resume`` passes over the diverging checkpoints newer than it)."""
        r, out = self.recipe, self.out
        healthy = next(((p, i) for p, i in iter_infos(self.ckpt_dir) if not health(i)), None)
        lr = f"{r.optim.lr / 10:.6g}"
        extra = "" if r.optim.clip_grad else "; --set optim.clip_grad=1.0 may help too"
        if r.train.precision == "bf16":
            extra += "; so may --set train.precision=fp32"
        recipe = out / formats.RUN_RECIPE
        if healthy is None:
            where = "no healthy checkpoint was written before it"
            cmd = f"sslhub train {recipe} --out {out} --overwrite --set optim.lr={lr}"
        else:
            path, info = healthy
            where = f"the newest healthy checkpoint is {path} (step {info['step']}, finite and not diverging)"
            cmd = f"sslhub train {recipe} --out {out} --resume --set optim.lr={lr}"
        return NonFiniteLoss(f"{what}: training stopped; {where}. Continue at a tenth of the learning rate "
                             f"(optim.lr {r.optim.lr:g} → {lr}{extra}): {cmd}")

    # ------------------------------------------------------------------ log, checkpoint
    def log(self, step: int, logged: dict[str, float], bar: tqdm) -> None:
        self._n_since += self.step_batch
        done = step + 1
        if done % self.recipe.train.log_every and done != self.total:
            return
        now = time.perf_counter()
        self.elapsed += now - self._t_last
        row = {"step": done, "epoch": done / self.plan.steps_per_epoch, "lr": float(self.lrs[step]), **logged,
               "img_per_s": self._n_since / max(now - self._t_last, 1e-9)}
        self.metrics_log.write(row)
        bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
        self._t_last, self._n_since = now, 0

    def checkpoint(self, done: int, force: bool = False) -> Path | None:
        """Save the state after ``done`` steps (every ``train.ckpt_every`` and at the end), keep the newest
        ``train.keep_checkpoints``; a state holding a NaN or an infinity is never written."""
        tc = self.recipe.train
        if not (force or done % tc.ckpt_every == 0 or done == self.total):
            return None
        data = {"data_mode": "memory"}
        if self.stream is not None:  # every process's lanes: a collective, before rank 0 alone goes on
            positions = D.all_reduce_sum(self.stream.position_tensor())
            data = {"data_mode": "stream", "data_lanes": self.plan.lanes,
                    "data": {"positions": positions, "fingerprint": self.plan.fingerprint()}}
        if not D.is_main():
            return None
        state = {"model": self.method.state_dict(), "optim": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "step": done, "elapsed": self.elapsed, "recipe": json.dumps(self.recipe.to_dict()),
                 "loss": self.last_loss, "weight_norm": weight_norm(self.params),
                 "weight_norm_start": self.weight_norm_start, **data}
        bad = non_finite(state)
        if bad:
            raise self.diverged(f"after step {done} {len(bad)} tensors are not finite ({', '.join(bad[:3])}"
                                f"{' …' if len(bad) > 3 else ''}), so no checkpoint was written")
        path = checkpoint_path(self.ckpt_dir, done)
        save_state(path, state)
        prune(self.ckpt_dir, tc.keep_checkpoints)
        return path

    def stop_requested(self, local: bool) -> bool:
        """Whether any process got Ctrl-C (all processes stop at the same step)."""
        if self.world == 1:
            return local
        flag = torch.tensor([float(local)], device=self.device)
        return bool(D.all_reduce_sum(flag).item() > 0)

    def interrupted(self, done: int) -> None:
        """Ctrl-C between steps: a checkpoint of step ``done`` (unless just written) and how to resume."""
        path = checkpoint_path(self.ckpt_dir, done)
        missing = torch.tensor([float(D.is_main() and not path.exists())])  # rank 0's view: the folder may not be shared
        if D.all_reduce_sum(missing).item() > 0:
            self.checkpoint(done, force=True)
        D.barrier()
        raise TrainingInterrupted(f"interrupted at step {done}/{self.total}: the run is saved in {path}; continue "
                                  f"it with: sslhub train {self.out / formats.RUN_RECIPE} --out {self.out} --resume")

    # ------------------------------------------------------------------ finish
    def finish(self) -> dict[str, Any]:
        result, error = {}, None
        if D.is_main():
            if self.metrics_log.rows:
                plot_curves(self.metrics_log.path)
            result, error = self.export()
        D.barrier()  # every process gets here before an error is raised: none waits for the others
        if error is not None:
            raise error
        return result

    def export(self) -> tuple[dict[str, Any], SslhubError | None]:
        """The export, written once; it is evaluated on the folder, loaded as users load it. With bad evaluation
        data the export is still written and the error is returned with what was written."""
        self.method.eval()
        failed: list[SslhubError] = []
        knn_test = self.knn_test()  # resolved once: an `auto` without a split is said once
        try:
            test = self.decode_test(knn_test)
        except SslhubError as e:
            failed.append(e)
            test = None
        figures = self.pretext(test)
        files = self.pictures(test)
        info = {"method": self.recipe.method, "paper": self.method.paper, "recipe": self.recipe.to_dict(),
                "recipe_file": self.recipe.source, "steps": self.total, "global_batch": self.step_batch,
                "processes": self.world, "train_data": self.recipe.data.train, "train_images": self.n_train,
                "train_seconds": round(self.elapsed, 1), "eval": dict(figures)}

        def evaluate(folder: Path) -> dict[str, Any]:
            if not failed:
                try:
                    figures.update(self.evaluate_export(folder, test, knn_test))
                except SslhubError as e:
                    failed.append(e)
            return figures

        export = self.method.export(self.out / formats.RUN_EXPORT, info, evaluate=evaluate, files=files)
        (self.out / formats.RUN_METRICS_JSON).write_text(json.dumps({"steps": self.total, **figures}, indent=1))
        error = SslhubError(f"{failed[0]}\n(training finished and {export} is written, without evaluation figures: "
                            "fix the eval.* settings and evaluate it with `sslhub eval`)") if failed else None
        return {"export": str(export), "steps": self.total, **figures}, error

    def knn_test(self) -> str:
        """The k-NN queries: ``eval.knn.test``, with ``auto`` resolved to the training data's own held-out split
        ("" when it has none: k-NN is then skipped, never run on another data set)."""
        r, kc = self.recipe, self.recipe.eval.knn
        if kc.test != "auto":
            return kc.test
        if has_split(r.data.train, kc.test_split):
            return r.data.train
        log.warning("eval.knn.test=auto: %s has no %r split of its own, so no k-NN figure is measured (set "
                    "eval.knn.test to a labelled held-out set of the same classes)", r.data.train, kc.test_split)
        return ""

    def decode_test(self, test: str) -> DecodedImages | None:
        """The k-NN queries ``test`` (from ``knn_test``), decoded once at the encoder's size, or None."""
        r = self.recipe
        if not test:
            return None
        return decode_all(open_source(test, r.eval.knn.test_split), r.encoder.image_size, r.data.num_workers,
                          progress=self.progress, desc="decoding test")

    def pretext(self, test: DecodedImages | None) -> dict[str, Any]:
        """The method's own pretext-task accuracy on the test images (methods with a pretext task)."""
        if not self.recipe.eval.pretext or test is None:
            return {}
        with self.autocast():
            res = self.method.evaluate(test.images, test.labels)
        return {"pretext": res} if res else {}

    def pictures(self, test: DecodedImages | None, n: int = 8) -> dict[str, tuple[bytes, str]]:
        """The method's pictures (masked modeling: reconstructions) of the first ``n`` held-out images (training
        images when there is no held-out split), written into the run folder; returned for the export."""
        if test is not None:
            images, what = test.images[:n], "held-out images"
        else:
            first = self.data.images[:n] if self.data is not None else getattr(self, "_first_images", None)
            if first is None:
                return {}
            images, what = first, "training images (no held-out split)"
        with self.autocast():
            files = self.method.pictures(images.to(self.device), what)
        for name, (data, _) in files.items():
            atomic_write_bytes(self.out / name, data)
        return files

    def evaluate_export(self, folder: Path, test: DecodedImages | None, knn_test: str) -> dict[str, Any]:
        """k-NN, zero-shot and retrieval through the inference layer, on the folder as a user loads it."""
        r, ev, kc, out = self.recipe, self.recipe.eval, self.recipe.eval.knn, {}
        if not (knn_test or ev.zeroshot or ev.retrieval.data):
            return out
        enc = load_encoder(folder, device=self.device)
        workers = r.data.num_workers
        if knn_test:
            same_size = protocols.decode_size(enc) == r.encoder.image_size  # else decoded at the export's size
            same_bank = kc.train in ("", r.data.train) and kc.train_split == r.data.split
            out["knn"] = protocols.knn(enc, kc.train or r.data.train, kc.train_split, knn_test, kc.test_split, kc.k,
                                       kc.temperature, workers, self.progress,
                                       bank_data=self.data if same_bank and same_size and self.data is not None else None,
                                       stream_bank=self.data is None and same_bank,
                                       test_data=test if same_size else None)
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


def train(recipe: Recipe, out_dir: str | Path, resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> dict[str, Any]:
    """Train ``recipe``; returns the evaluation metrics and the export folder (on rank 0).

    A run folder that already holds a run needs ``resume`` (continue it) or ``overwrite`` (replace it)."""
    return Trainer(recipe, out_dir, resume, progress, overwrite).fit()


__all__ = ["Trainer", "train", "NonFiniteLoss", "TrainingInterrupted", "accumulate_gradients", "apply_update",
           "pick_captions", "step_seed"]
