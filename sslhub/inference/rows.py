"""Row ids and metadata of a large index kept on disk: one JSON line per row, read on demand.

An on-disk index (``sslhub.inference.ondisk``) of 10M vectors cannot keep 10M Python dicts in RAM. Its
folder holds ``metadata.jsonl`` (row i's ``{"id", ...}`` on line i) and ``offsets.npy`` (uint64, N + 1 byte
offsets of the lines, memory-mapped). :class:`JsonlRows` reads one row with one seek; ``.ids`` and
``.metadata`` are sequences that look like the lists an in-RAM :class:`~sslhub.inference.retrieval.Index`
holds (``index.ids[row]``, ``index.metadata[row]``), so ``search_meta`` returns the same dicts.

    with RowWriter(folder / "metadata.jsonl", folder / "offsets.npy", n) as w:
        w.write(row_dict)  # n times
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sslhub.errors import InputError

log = logging.getLogger("sslhub.inference.rows")


class RowWriter:
    """Writes ``n`` JSON rows and their byte offsets; ``close`` checks that exactly ``n`` were written."""

    def __init__(self, jsonl: Path, offsets: Path, n: int):
        self.n, self.count, self.pos = n, 0, 0
        self.file = open(jsonl, "wb")
        self.offsets = np.lib.format.open_memmap(offsets, mode="w+", dtype=np.uint64, shape=(n + 1,))

    def write(self, row: dict[str, Any]) -> None:
        if self.count >= self.n:
            raise InputError(f"more rows than the {self.n} announced")
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        self.file.write(line)
        self.offsets[self.count] = self.pos
        self.pos += len(line)
        self.count += 1

    def close(self) -> None:
        self.offsets[self.count] = self.pos
        self.offsets.flush()
        self.file.close()
        del self.offsets
        if self.count != self.n:
            raise InputError(f"{self.count} rows written for {self.n} vectors")

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.file.close()


class JsonlRows:
    """Row ``i`` of ``metadata.jsonl`` by one seek at ``offsets[i]`` (offsets memory-mapped, rows not cached)."""

    def __init__(self, jsonl: Path, offsets: Path, count: int):
        self.path = Path(jsonl)
        self.offsets = np.load(offsets, mmap_mode="r")
        if self.offsets.shape != (count + 1,) or int(self.offsets[-1]) != self.path.stat().st_size:
            raise InputError(f"{offsets} does not match {count} rows of {self.path} "
                             f"({self.offsets.shape[0] - 1} offsets, last {int(self.offsets[-1])}, "
                             f"file {self.path.stat().st_size} bytes)")
        self.count = count
        self._local = threading.local()  # one file handle per thread (the demo serves from threads)
        self.ids, self.metadata = _Field(self, "id"), _Field(self, "metadata")

    def _file(self):
        f = getattr(self._local, "file", None)
        if f is None:
            f = self._local.file = open(self.path, "rb")
        return f

    def __len__(self) -> int:
        return self.count

    def row(self, i: int) -> dict[str, Any]:
        if not -self.count <= i < self.count:
            raise IndexError(f"row {i} of {self.count}")
        i %= self.count
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        f = self._file()
        f.seek(start)
        return json.loads(f.read(end - start))

    def __iter__(self) -> Iterator[dict[str, Any]]:  # sequential: one pass over the file, no seeks
        with open(self.path, "rb") as f:
            for line in f:
                yield json.loads(line)


def split_row(row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A stored row → (id, metadata): the metadata of ``sslhub index build`` (``key`` = id, then the rest)."""
    rest = {k: v for k, v in row.items() if k != "id"}
    return row.get("id"), {"key": row.get("id"), **rest}


class _Field(Sequence):
    """``rows.ids`` or ``rows.metadata``: a lazy, read-only sequence over the rows."""

    def __init__(self, rows: JsonlRows, which: str):
        self.rows, self.which = rows, which

    def __len__(self) -> int:
        return len(self.rows)

    def _pick(self, row: dict[str, Any]):
        return split_row(row)[0 if self.which == "id" else 1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._pick(self.rows.row(int(i)))

    def __iter__(self):
        return (self._pick(r) for r in self.rows)


class ShardVectors:
    """The float vectors of an on-disk index's rows, memory-mapped from the embeddings folder it was built from
    (``np.load(mmap_mode="r")`` per shard; nothing copied): ``vectors.get(rows)`` → ``(len(rows), D)`` float32.

    ``record`` is what the build wrote in meta.json: ``{"embeddings": absolute folder, "shards": [{"name",
    "count", "sha256"}]}``; :func:`open_vectors` checks it against the folder's done files."""

    def __init__(self, folder: Path, shards: list[dict[str, Any]]):
        self.folder = Path(folder)
        self.arrays = [np.load(self.folder / f"{s['name']}.npy", mmap_mode="r", allow_pickle=False) for s in shards]
        for a, s in zip(self.arrays, shards):
            if a.ndim != 2 or len(a) != int(s["count"]):
                raise InputError(f"{self.folder / (s['name'] + '.npy')} is {a.shape}, recorded {s['count']} rows")
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)
        self.dim = int(self.arrays[0].shape[1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (global numbers ≥ 0, any order) → float32 ``(len(rows), D)``; one sorted read per shard."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            local = rows[at] - self.starts[s]
            order = np.argsort(local, kind="stable")
            out[at[order]] = self.arrays[s][local[order]]
        return out


def open_vectors(record: dict[str, Any] | None, where: str) -> ShardVectors | None:
    """The vectors an index recorded, or None (with a warning naming why) when its embeddings folder is gone
    or changed: the index then ranks by its compressed codes alone."""
    if not record:
        return None
    folder = Path(record["embeddings"])
    try:
        for s in record["shards"]:
            done = json.loads((folder / f"{s['name']}.done.json").read_text())
            if done.get("sha256") != s["sha256"] or int(done["count"]) != int(s["count"]):
                raise InputError(f"shard {s['name']} changed since the index was built (sha256 or count differ)")
        return ShardVectors(folder, record["shards"])
    except (OSError, ValueError, KeyError, TypeError, InputError) as e:
        log.warning("%s: cannot re-rank by exact scores: the embeddings at %s are missing or changed (%s); "
                    "searching by the compressed codes alone (lower recall). Rebuild the index, or restore the "
                    "folder.", where, folder, e)
        return None
