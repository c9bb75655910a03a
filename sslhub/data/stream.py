"""Streaming training data: WebDataset shards read shard by shard, so memory does not grow with the data set.

The in-memory path (``decode_all`` + ``BatchPlan``) decodes the whole training set once; this one decodes each
image when a step needs it, in DataLoader worker processes, and holds at most a shuffle buffer of *encoded*
samples per lane.  ``data.cache: auto`` picks between them by the decoded size (``choose_cache``).

The order contract — everything a step sees is a function of (seed, epoch, lane, position):

- **Lanes.**  The shards are dealt to ``K = data.lanes`` lanes once (shard i → lane i mod K).  Each epoch a lane
  reads its shards in an order drawn from ``(seed, epoch, lane)`` and passes the samples through a shuffle buffer
  of ``data.shuffle_buffer`` encoded samples drawn from the same generator; a sample is decoded (to the recipe's
  fixed-size uint8) as it leaves the buffer.  A lane that runs out inside an epoch starts another pass over its
  shards (a new order, new draws).
- **Steps.**  Each step every lane gives its next ``m = step batch / K`` readable samples; the step's batch is the
  lanes' chunks in lane order.  Process r owns lanes ``[r·K/W, (r+1)·K/W)``, so its share is a contiguous slice of
  the step's batch, as with the in-memory plan, and the union over processes does not depend on their number
  (fix ``data.lanes`` to keep one order across process counts: it must be a multiple of every count used).
- **Workers.**  A process's DataLoader workers split its lanes (its j-th lane → worker j mod n): every worker, and
  every process, reads shards no other reads.  Each worker yields one item per step holding its lanes' chunks;
  the main process puts the lanes back in order.
- **Uneven shards.**  Lanes may hold different numbers of samples (shard counts not divisible by K, short last
  shards).  ``data.uneven: drop`` (default) makes an epoch as long as the shortest lane allows: every lane stops
  there and the rest of the longer lanes is dropped for that epoch (a different rest each epoch, as the shard order
  and buffer draws change); ``repeat`` makes it as long as the longest lane needs: shorter lanes start a second pass
  (a few samples seen twice).  The setup log says how many samples each epoch drops or repeats.
- **Position.**  Each chunk carries its lane's position (epoch, samples drawn from the buffer so far); the
  trainer gathers every lane's position into each checkpoint.  ``--resume`` replays each lane's draws up to its
  position *without decoding* and continues: a run killed at any point (even SIGKILL) ends with the weights of an
  uninterrupted one.  Unreadable images are skipped (and counted) wherever they fall, which is why positions are
  recorded rather than computed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from sslhub import formats
from sslhub.data.images import BadImage, decode
from sslhub.data.sources import DataError, Sample, captions_of, count_shard, iter_shard
from sslhub.errors import InputError

log = logging.getLogger("sslhub.data")


def _split_info(shards: list[Path], split: str) -> dict:
    """The ``dataset.json`` entry of ``split`` when it lists exactly these shards, else ``{}``."""
    meta = shards[0].parent / formats.DATASET_JSON if shards else None
    if meta is None or not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text()).get("splits", {}).get(split, {})
    except ValueError:
        return {}
    return info if isinstance(info, dict) and info.get("shards") == [s.name for s in shards] else {}


def shard_counts(shards: list[Path], split: str, workers: int = 2, progress: bool = True) -> list[int]:
    """The sample count of every shard: from ``dataset.json`` (``splits[split]["counts"]``) when it lists them,
    else counted from the tar headers (``count_shard``) in ``workers`` threads."""
    counts = _split_info(shards, split).get("counts")
    if isinstance(counts, list) and len(counts) == len(shards):
        return [int(c) for c in counts]
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(shards), desc="counting samples", unit="shard", disable=not progress, leave=False) as bar:
        counts = []
        for c in pool.map(count_shard, shards):
            counts.append(c)
            bar.update(1)
    return counts


def listed_size(shards: list[Path], split: str) -> Optional[int]:
    """The split's sample count as its ``dataset.json`` states it (``splits[split]["n"]``), when it lists exactly
    these shards; else None.  Cheap: ``data.cache: auto`` decides from it without counting the shards."""
    n = _split_info(shards, split).get("n")
    return int(n) if isinstance(n, int) else None


@dataclass
class StreamPlan:
    """Which shards feed which lane, and how many steps an epoch has (see the module docstring)."""

    shards: list[Path]
    counts: list[int]
    lanes: int
    step_batch: int
    seed: int
    buffer: int = 2000
    uneven: str = "drop"
    size: int = 32  # decoded image size (px)
    split: str = "train"
    spec: str = ""

    def __post_init__(self):
        k, g = self.lanes, self.step_batch
        if k < 1:
            raise InputError(f"data.lanes={k}: must be >= 1")
        if k > len(self.shards):
            raise DataError(f"{self.spec}: data.lanes={k} exceeds its {len(self.shards)} shard(s): every lane needs "
                            f"shards of its own; lower data.lanes or write the data in more shards")
        if g % k:
            raise InputError(f"data.lanes={k} does not divide the step's batch of {g} images (data.batch_size × "
                             "train.accumulate): every lane gives the same number of images each step")
        short = min(self.lane_sizes)
        if short < self.per_lane:
            raise DataError(f"{self.spec}: a lane holds {short} samples, fewer than the {self.per_lane} it gives each "
                            f"step: lower data.lanes or data.batch_size")

    @property
    def per_lane(self) -> int:
        return self.step_batch // self.lanes

    def lane_shards(self, lane: int) -> list[int]:
        return list(range(lane, len(self.shards), self.lanes))

    @property
    def lane_sizes(self) -> list[int]:
        return [sum(self.counts[i] for i in self.lane_shards(k)) for k in range(self.lanes)]

    @property
    def steps_per_epoch(self) -> int:
        sizes, m = self.lane_sizes, self.per_lane
        return min(s // m for s in sizes) if self.uneven == "drop" else max(math.ceil(s / m) for s in sizes)

    def __len__(self) -> int:
        return sum(self.counts)

    def uneven_per_epoch(self) -> int:
        """Samples dropped (``drop``) or repeated (``repeat``) each epoch by the lanes' unequal sizes."""
        need = self.steps_per_epoch * self.per_lane
        return sum(abs(s - need) for s in self.lane_sizes)

    def lanes_of(self, rank: int, world: int) -> list[int]:
        if self.lanes % world:
            raise InputError(f"data.lanes={self.lanes} is not a multiple of the {world} processes: each process "
                             f"reads whole lanes; set data.lanes to a multiple of {world}")
        per = self.lanes // world
        return list(range(rank * per, (rank + 1) * per))

    def fingerprint(self) -> str:
        """What the order depends on besides the seed: the shards (names and counts) and the lane layout."""
        h = hashlib.sha256(json.dumps([[s.name for s in self.shards], self.counts, self.lanes, self.buffer,
                                       self.uneven, self.step_batch]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        sizes = self.lane_sizes
        what = "dropped" if self.uneven == "drop" else "repeated"
        return (f"{len(self):,} samples in {len(self.shards)} shards over {self.lanes} lanes ({min(sizes):,}–"
                f"{max(sizes):,} samples each), {self.per_lane} images per lane and step, {self.steps_per_epoch} "
                f"steps an epoch; data.uneven={self.uneven}: {self.uneven_per_epoch():,} samples {what} per epoch")


def lane_draws(plan: StreamPlan, lane: int, epoch: int, skipped: list[str]) -> Iterator[Sample]:
    """The lane's samples for ``epoch`` as they leave its shuffle buffer, pass after pass (never ends)."""
    for p in itertools.count():
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([plan.seed, epoch, lane, p])))
        own = plan.lane_shards(lane)
        buf: list[Sample] = []
        for i in rng.permutation(len(own)):
            for sample in iter_shard(plan.shards[own[i]], skipped):
                if len(buf) < plan.buffer:
                    buf.append(sample)
                    continue
                j = int(rng.integers(len(buf)))
                out, buf[j] = buf[j], sample
                yield out
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()


@dataclass
class LaneState:
    """One lane's reader inside a worker: the current epoch's draws and how many have been taken."""

    lane: int
    epoch: int = -1
    drawn: int = 0
    draws: Optional[Iterator[Sample]] = None
    skipped: list[str] = field(default_factory=list)

    def start(self, plan: StreamPlan, epoch: int, drawn: int = 0) -> None:
        """Begin ``epoch`` at position ``drawn``: the draws before it are replayed without decoding."""
        self.epoch, self.drawn, self.draws = epoch, 0, lane_draws(plan, self.lane, epoch, self.skipped)
        for _ in range(drawn):
            next(self.draws)
        self.drawn = drawn

    def chunk(self, plan: StreamPlan, texts: bool):
        images, labels, keys, caps = [], [], [], []
        while len(images) < plan.per_lane:
            sample = next(self.draws)
            self.drawn += 1
            if texts and not captions_of(sample):  # as with_captions does for the in-memory path
                self.skipped.append(f"{sample.key}: no caption (.txt or .json captions)")
                continue
            try:
                images.append(decode(sample, plan.size))
            except BadImage as e:
                self.skipped.append(str(e))
                log.warning("streaming %s: skipped an unreadable sample: %s", plan.spec, e)
                continue
            labels.append(sample.label)
            keys.append(sample.key)
            if texts:
                caps.append(captions_of(sample))
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long), "keys": keys,
                "texts": caps if texts else None, "position": (self.epoch, self.drawn)}


class LaneDataset(IterableDataset):
    """Yields, for each step from ``start`` to ``total``, ``{"step", "lanes": {lane: chunk}}`` for this worker's lanes."""

    def __init__(self, plan: StreamPlan, lanes: list[int], start: int, total: int,
                 positions: dict[int, tuple[int, int]], texts: bool = False):
        super().__init__()
        self.plan, self.lanes, self.start, self.total = plan, lanes, start, total
        self.positions, self.texts = positions, texts

    def __iter__(self):
        info = get_worker_info()
        mine = self.lanes if info is None else self.lanes[info.id :: info.num_workers]
        states = [LaneState(k) for k in mine]
        spe = self.plan.steps_per_epoch
        for step in range(self.start, self.total):
            epoch = step // spe
            chunks = {}
            for st in states:
                if st.epoch != epoch:
                    at_epoch, drawn = self.positions.get(st.lane, (epoch, 0)) if step == self.start else (epoch, 0)
                    st.start(self.plan, epoch, drawn if at_epoch == epoch else 0)
                chunks[st.lane] = st.chunk(self.plan, self.texts)
            yield {"step": step, "worker": os.getpid(), "lanes": chunks}


@dataclass
class StepRows:
    """This process's share of one step: images (n, 3, S, S) uint8, labels, keys, captions (lists or None)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    texts: Optional[list[list[str]]]


class StreamLoader:
    """The rows of each step for one process, from its lanes, decoded in ``workers`` DataLoader processes."""

    def __init__(self, plan: StreamPlan, rank: int, world: int, workers: int, start: int, total: int,
                 positions: dict[int, tuple[int, int]] | None = None, texts: bool = False):
        self.plan, self.own = plan, plan.lanes_of(rank, world)
        self.workers = min(workers, len(self.own))
        if workers > self.workers:
            log.info("data.num_workers=%d: %d used, one per lane of this process (data.lanes=%d over %d processes)",
                     workers, self.workers, plan.lanes, world)
        self.positions = {k: v for k, v in (positions or {}).items() if k in self.own}
        ds = LaneDataset(plan, self.own, start, total, self.positions, texts)
        self.loader = DataLoader(ds, batch_size=None, num_workers=self.workers,
                                 prefetch_factor=2 if self.workers else None)
        self.iterator = iter(self.loader) if start < total else iter(())
        self.next_step = start

    def rows(self, step: int) -> StepRows:
        if step != self.next_step:
            raise RuntimeError(f"streaming data asked for step {step}, expected {self.next_step}")
        chunks = {}
        for _ in range(max(1, self.workers)):
            item = next(self.iterator)
            if item["step"] != step:
                raise RuntimeError(f"a data worker sent step {item['step']} for step {step}")
            chunks.update(item["lanes"])
        parts = [chunks[k] for k in self.own]
        for k in self.own:
            self.positions[k] = tuple(chunks[k]["position"])
        self.next_step = step + 1
        texts = [t for c in parts for t in c["texts"]] if parts[0]["texts"] is not None else None
        return StepRows(torch.cat([c["images"] for c in parts]), torch.cat([c["labels"] for c in parts]),
                        [key for c in parts for key in c["keys"]], texts)

    def position_tensor(self) -> torch.Tensor:
        """(lanes, 2) int64: this process's lanes filled with (epoch, drawn), the others zero (summed over processes)."""
        t = torch.zeros(self.plan.lanes, 2, dtype=torch.long)
        for k, (e, d) in self.positions.items():
            t[k] = torch.tensor([e, d])
        return t

    def close(self) -> None:
        self.iterator = iter(())
        del self.loader


def positions_from(t: torch.Tensor) -> dict[int, tuple[int, int]]:
    return {k: (int(t[k, 0]), int(t[k, 1])) for k in range(t.shape[0])}


def decoded_mb(n: int, size: int) -> float:
    return n * 3 * size * size / 2**20


def memory_limit_mb() -> float:
    """A quarter of the machine's physical memory (the default ``data.cache_limit_mb``)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4 / 2**20
    except (ValueError, OSError, AttributeError):
        return 4096.0


__all__ = ["StreamPlan", "StreamLoader", "LaneDataset", "lane_draws", "shard_counts", "listed_size", "positions_from",
           "decoded_mb", "memory_limit_mb"]
