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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sslhub.errors import InputError


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
