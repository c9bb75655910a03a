"""Embed a data set of any size into resumable embedding shards (``sslhub embed``; format: ``embeddings``).

    embed(enc, "../shared/data/cifar10", "runs/emb", size=32)           # one process
    torchrun --nproc_per_node 2 -m sslhub embed --model M --data D --out EMB

Units of work: the data's shard files (``list_shards``), or for an image folder, flat folder or CSV, chunks
of ``chunk`` samples of its list (paths only: nothing is decoded up front). Unit ``i`` is embedding shard
``"%05d" % i`` and belongs to process ``i % world_size``. A process streams its pending units
(``iter_shard``) through DataLoader workers that decode batches to ``(3, size, size)`` uint8 (worker ``w``
decodes the unit's batches ``g ≡ w`` mod workers, numbered across units, so the loader hands them over in
order); the main process runs the encoder (``Encoder.embed_images``: the weights' own preprocessing and
L2-normalisation) and writes each unit's shard once its last batch is in. Memory holds a few batches of
pixels and the embeddings of the units in flight, whatever the data set's size.

Resume: a unit whose shard is finished (``embeddings.shard_status``) is skipped; a cut-short shard leaves
only temp files, removed at start. A folder embedded with another model, data, split, dim, dtype or
normalisation is refused (``--overwrite`` clears it). At the end every process waits for every shard on
disk (so a rank with nothing left does not sit in a collective past the process group's 30-minute
timeout), then rank 0 checks the folder is complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from sslhub import distributed as dist
from sslhub.data.images import BadImage, decode
from sslhub.data.sources import DataError, Sample, captions_of, iter_shard, list_shards, open_source
from sslhub.inference import embeddings as emb
from sslhub.inference.embeddings import EmbeddingsError

log = logging.getLogger("sslhub.inference.embed")

COMPARED = ("model", "data", "split", "dim", "dtype", "normalized", "shards")  # what a resume must match


@dataclass
class Unit:
    """One embedding shard's input: a shard file, or a chunk of a sample list."""

    index: int
    source: str  # the data shard's file name, or "chunk-00003" of a folder / CSV
    path: Optional[str] = None
    samples: Optional[list[Sample]] = None
    root: Optional[str] = None  # folder that chunk samples' ids are relative to

    @property
    def name(self) -> str:
        return emb.shard_name(self.index)


def plan_units(spec: str, split: str, chunk: int = 10_000) -> tuple[list[Unit], Optional[list[str]]]:
    """The units of ``spec`` (in order) and its class names; a missing or empty source raises ``DataError``."""
    if chunk < 1:
        raise EmbeddingsError(f"--chunk must be at least 1 (got {chunk})")
    shards, classes = list_shards(spec, split)
    if shards:
        return [Unit(i, p.name, path=str(p)) for i, p in enumerate(shards)], classes
    src = open_source(spec, split)  # an image folder / flat folder / CSV: file paths, nothing decoded
    if src.skipped:
        log.warning("%s: skipped %d sample(s): %s", spec, len(src.skipped), "; ".join(src.skipped[:5]))
    root = spec if Path(spec).is_dir() else str(Path(spec).parent)
    units = [Unit(i, f"chunk-{i:05d}", samples=src.samples[s:s + chunk], root=root)
             for i, s in enumerate(range(0, len(src.samples), chunk))]
    return units, src.classes


def _row(sample: Sample, unit: Unit) -> dict[str, Any]:
    if unit.path is not None:  # iter_shard keys are "<shard file>:<key>"
        sid = sample.key[len(unit.source) + 1:] if sample.key.startswith(unit.source + ":") else sample.key
    else:
        sid = os.path.relpath(sample.path, unit.root) if sample.path else sample.key
    row: dict[str, Any] = {"id": sid, "label": int(sample.label), "source": unit.source}
    caps = captions_of(sample)
    if caps:
        row["text"] = caps[0]
        if len(caps) > 1:
            row["captions"] = caps
    return row


class _Batches(IterableDataset):
    """Decoded batches of the pending units: ``(unit, batch, last, images uint8 | None, rows, errors, fatal)``.

    Every worker reads every unit (a shard is streamed, not decoded) and decodes only its own batches."""

    def __init__(self, units: list[Unit], size: int, batch_size: int):
        self.units, self.size, self.batch_size = units, size, batch_size

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        g = 0  # batch number across units: batch g is decoded by worker g % nw
        for unit in self.units:
            skipped: list[str] = []
            samples = iter_shard(unit.path, skipped) if unit.path is not None else iter(unit.samples)
            pending: list[Sample] = []
            b = 0
            try:
                for sample in samples:
                    if len(pending) == self.batch_size:
                        if g % nw == wid:
                            yield self._decode(unit, b, False, pending, [])
                        g, b, pending = g + 1, b + 1, []
                    pending.append(sample if g % nw == wid else None)  # counted, decoded by its worker
            except DataError as e:  # raised again by the main process, without the worker's traceback
                yield unit.index, b, True, None, [], [], str(e)
                return
            if g % nw == wid:  # the last batch (maybe empty) carries the unit's skipped samples
                yield self._decode(unit, b, True, pending, skipped)
            g += 1

    def _decode(self, unit: Unit, b: int, last: bool, samples: list[Sample], errors: list[str]) -> tuple:
        images, rows, errors = [], [], list(errors)
        for s in samples:
            try:
                images.append(decode(s, self.size))
                rows.append(_row(s, unit))
            except BadImage as e:
                errors.append(str(e))
        return unit.index, b, last, torch.stack(images) if images else None, rows, errors, None


@dataclass
class _Open:
    """A unit whose batches are coming in."""

    parts: dict
    errors: list
    start: float
    n_batches: Optional[int] = None


def _canonical(spec: str) -> str:
    """A path as an absolute path (a resume from another folder still matches), anything else as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else str(spec)


def check_manifest(out: Path, want: dict[str, Any]) -> bool:
    """Whether ``out`` already has a manifest; raise when it is not for ``want`` (the fields in COMPARED)."""
    if not (out / emb.MANIFEST).exists():
        return False
    have = emb.read_manifest(out)
    for key in COMPARED:
        if have.get(key) != want[key]:
            shown = (f"{len(have.get(key) or [])} shards vs {len(want[key])}" if key == "shards"
                     else f"{have.get(key)!r}, this run: {want[key]!r}")
            raise EmbeddingsError(f"{out / emb.MANIFEST} was written for another {key} ({shown}): pass --overwrite "
                                  f"to replace those embeddings, or another --out")
    return True


def _clear(out: Path) -> None:
    """Empty ``out`` (``--overwrite``), refusing a folder that holds anything but embeddings."""
    if not out.is_dir():
        return
    if not (out / emb.MANIFEST).exists() and any(out.iterdir()):
        raise EmbeddingsError(f"--overwrite: {out} is not an embeddings folder (no {emb.MANIFEST}) and not empty; "
                              f"refusing to delete it: choose another --out")
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def embed(enc, data: str, out: str | Path, *, size: int, split: str = "train", model: Optional[str] = None,
          normalize: bool = True, dtype: str = "float16", batch_size: int = 256, workers: int = 2,
          chunk: int = 10_000, overwrite: bool = False, progress: bool = True, poll_s: float = 1.0) -> dict:
    """Embed ``data`` with ``enc`` into ``out``: this process's units (unit i: process i % world_size).

    ``size``: the pixels to decode at (``sslhub.eval.protocols.decode_size(enc)``). Call in every process
    of a torchrun job (``sslhub.distributed.init_from_env`` first); returns the summary (all processes).
    """
    if dtype not in emb.DTYPES:
        raise EmbeddingsError(f"--dtype {dtype!r}: choose one of {', '.join(emb.DTYPES)}")
    if batch_size < 1 or workers < 0:
        raise EmbeddingsError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    out = Path(out)
    start = time.perf_counter()
    units, classes = plan_units(data, split, chunk)
    want = {"model": _canonical(model or enc.name or "?"), "data": _canonical(data), "split": split,
            "dim": int(enc.dim), "dtype": dtype, "normalized": bool(normalize), "shards": [u.name for u in units]}
    existed = False if overwrite else check_manifest(out, want)  # every rank: an error stops all, none hangs
    dist.barrier()
    if dist.is_main():
        if overwrite:
            _clear(out)
        out.mkdir(parents=True, exist_ok=True)
        removed = emb.clean_temp_files(out)
        if removed:
            log.info("%s: removed %d temp file(s) of shards cut short", out, removed)
        if not existed:
            emb.write_manifest(out, {**want, "classes": classes})
    dist.barrier()
    manifest = emb.read_manifest(out)
    rank, world = dist.rank(), dist.world_size()
    mine = [u for u in units if u.index % world == rank]
    todo = [u for u in mine if emb.shard_status(out, u.name, manifest) is None]
    finished_before = sum(emb.shard_status(out, u.name, manifest) is not None for u in units)
    if dist.is_main() and finished_before:
        log.info("%s: %d of %d shards already finished: skipped", out, finished_before, len(units))
    images, skipped = _run(enc, out, todo, size, normalize, dtype, batch_size, workers, progress and dist.is_main())
    _wait_for(out, [u.name for u in units], manifest, poll_s)
    totals = dist.all_reduce_sum(torch.tensor([images, skipped, len(todo)], dtype=torch.float64)).long().tolist()
    seconds = time.perf_counter() - start
    left = emb.unfinished_shards(out)
    if left:
        raise EmbeddingsError(f"{out}: shards {left[:10]} are not finished after the run: rerun the same command")
    summary = {"out": str(out), "model": want["model"], "data": want["data"], "split": split, "dim": want["dim"],
               "dtype": dtype, "normalized": bool(normalize), "images": totals[0], "skipped": totals[1],
               "seconds": round(seconds, 2), "img_per_s": round(totals[0] / max(seconds, 1e-9), 1),
               "shards": len(units), "shards_done": totals[2], "shards_skipped": finished_before,
               "processes": world, "embeddings": emb.count_embeddings(out)}
    if dist.is_main():
        log.info("embedded %d images (%d skipped) in %.1f s (%.1f img/s): %d shards done, %d already finished",
                 totals[0], totals[1], seconds, summary["img_per_s"], totals[2], finished_before)
    return summary


def _run(enc, out: Path, todo: list[Unit], size: int, normalize: bool, dtype: str, batch_size: int,
         workers: int, progress: bool) -> tuple[int, int]:
    """Embed ``todo`` into ``out``; returns (images embedded, samples skipped)."""
    if not todo:
        return 0, 0
    loader = DataLoader(_Batches(todo, size, batch_size), batch_size=None, num_workers=workers)
    by_index = {u.index: u for u in todo}
    # a total for chunks of a sample list; shards are not counted ahead (count_shard: ~1 s per 10k samples)
    total = sum(len(u.samples) for u in todo) if all(u.samples is not None for u in todo) else None
    done_units = 0
    open_units: dict[int, _Open] = {}
    n_images = n_skipped = 0
    with tqdm(total=total, desc=f"embedding {len(todo)} shards", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for index, b, last, pixels, rows, errors, fatal in loader:
            if fatal:
                raise DataError(fatal)
            state = open_units.setdefault(index, _Open({}, [], time.perf_counter()))
            vectors = np.empty((0, enc.dim), dtype=dtype)
            if pixels is not None:
                vectors = _to_dtype(enc.embed_images(pixels, batch_size=batch_size, normalize=normalize,
                                                     progress=False).numpy(), dtype, by_index[index])
            state.parts[b] = (vectors, rows)
            state.errors.extend(errors)
            if last:
                state.n_batches = b + 1
            bar.update(len(rows) + len(errors))
            if state.n_batches is not None and len(state.parts) == state.n_batches:
                n_images += _write(out, by_index[index], open_units.pop(index))
                n_skipped += len(state.errors)
                done_units += 1
                bar.set_postfix_str(f"shards {done_units}/{len(todo)}")
    return n_images, n_skipped


def _to_dtype(x: np.ndarray, dtype: str, unit: Unit) -> np.ndarray:
    y = x.astype(dtype)
    if not np.isfinite(y).all():
        why = ("over the float16 range (65504): pass --dtype float32 or --normalize" if np.isfinite(x).all()
               else "not finite (NaN/inf) out of the model")
        raise EmbeddingsError(f"{unit.source}: embeddings {why}")
    return y


def _write(out: Path, unit: Unit, state: _Open) -> int:
    parts = [state.parts[b] for b in range(state.n_batches)]
    vectors = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 0))
    rows = [r for p in parts for r in p[1]]
    if state.errors:
        shown = "; ".join(state.errors[:5]) + (f"; … {len(state.errors) - 5} more" if len(state.errors) > 5 else "")
        log.warning("%s: skipped %d unreadable sample(s): %s", unit.source, len(state.errors), shown)
    emb.write_embedding_shard(out, unit.name, vectors, rows,
                              {"source": unit.source, "seconds": round(time.perf_counter() - state.start, 3),
                               "skipped": len(state.errors), "skipped_samples": state.errors[:100],
                               "rank": dist.rank(), "world_size": dist.world_size()})
    return len(rows)


def _wait_for(out: Path, names: list[str], manifest: dict, poll_s: float) -> None:
    """Wait until every shard is finished on disk (the other processes' too), logging each minute what is left."""
    if dist.world_size() == 1:
        return
    last_log = time.monotonic()
    while True:
        left = [n for n in names if emb.shard_status(out, n, manifest) is None]
        if not left:
            return
        if time.monotonic() - last_log > 60:
            log.info("waiting for %d shard(s) of the other processes: %s", len(left), ", ".join(left[:5]))
            last_log = time.monotonic()
        time.sleep(poll_s)


def embed_in_memory(enc, data: str, *, size: int, split: str = "train", normalize: bool = True,
                    batch_size: int = 256, workers: int = 2, progress: bool = True,
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[list[str]], int]:
    """``data``'s embeddings ``(N, dim)`` float32, labels ``(N,)`` and class names, in this process, nothing
    written: images stream through the workers as in :func:`embed`, so memory holds the embeddings (N × dim × 4
    bytes), never the pixels (the trainer's k-NN bank when training streams).  Also the number of samples skipped."""
    units, classes = plan_units(data, split)
    loader = DataLoader(_Batches(units, size, batch_size), batch_size=None, num_workers=workers)
    parts: dict[tuple[int, int], tuple[torch.Tensor, list[int]]] = {}
    skipped = 0
    with tqdm(desc=f"embedding {data}", unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for index, b, _last, pixels, rows, errors, fatal in loader:
            if fatal:
                raise DataError(fatal)
            skipped += len(errors)
            if pixels is not None:
                vectors = enc.embed_images(pixels, batch_size=batch_size, normalize=normalize, progress=False)
                parts[(index, b)] = (vectors.float(), [r["label"] for r in rows])
            bar.update(len(rows) + len(errors))
    if not parts:
        raise DataError(f"{data}: none of its images could be decoded")
    order = sorted(parts)
    return (torch.cat([parts[k][0] for k in order]), torch.tensor([y for k in order for y in parts[k][1]]),
            classes, skipped)
