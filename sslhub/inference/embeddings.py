"""The on-disk format of a set of embeddings (what ``sslhub embed`` writes, what an on-disk index reads).

    EMB/
      embeddings.json     {"format": "sslhub-embeddings", "version": 1, "model", "data", "split", "dim",
                           "dtype": "float16" | "float32", "normalized", "shards": [names, in order]}
                          written once, atomically, before any shard
      {name}.npy          (N, dim) array of dtype, ``np.save`` format (``np.load(mmap_mode="r")`` works)
      {name}.jsonl        N lines, one JSON object per row: {"id", "label" (-1 = none), "source", ["text"]}
      {name}.done.json    {"count": N, "source", "sha256" (of the .npy file), "seconds"}, written last

A shard is finished iff its done file exists, parses, and its count agrees with the ``.npy`` header and
size (shape ``(count, dim)``, the manifest's dtype). Every file is written aside and moved into place
(``sslhub.atomic``), so a shard cut short leaves only hidden temp files (``.NAME.<hex>.tmp``), which are
ignored by readers and removed by :func:`clean_temp_files` on the next run.

Shard names are ``"%05d" % i`` for the i-th data shard (:func:`shard_name`).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sslhub.atomic import atomic_write, atomic_write_text
from sslhub.errors import InputError

FORMAT = "sslhub-embeddings"
VERSION = 1
MANIFEST = "embeddings.json"
DTYPES = ("float16", "float32")
REQUIRED = ("model", "data", "split", "dim", "dtype", "normalized", "shards")
_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class EmbeddingsError(InputError):
    """An embeddings folder that is missing, malformed, or not what was asked for."""


class UnfinishedEmbeddingsError(EmbeddingsError):
    """An embeddings folder with shards not (yet) finished: the embedding job has not run to its end."""


def shard_name(i: int) -> str:
    return "%05d" % i


def write_manifest(folder: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/embeddings.json`` atomically from ``info`` (the keys in :data:`REQUIRED`); returns it."""
    folder = Path(folder)
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise EmbeddingsError(f"embeddings manifest for {folder} lacks {missing}")
    if info["dtype"] not in DTYPES:
        raise EmbeddingsError(f"embeddings dtype {info['dtype']!r} is not one of {list(DTYPES)}")
    manifest = {"format": FORMAT, "version": VERSION, **info}
    manifest["dim"] = int(manifest["dim"])
    manifest["normalized"] = bool(manifest["normalized"])
    manifest["shards"] = [str(s) for s in manifest["shards"]]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``folder/embeddings.json``, checked; a clear :class:`EmbeddingsError` when missing or malformed."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EmbeddingsError(f"{path} not found: {folder} is not an embeddings folder "
                              f"(write one with `sslhub embed --model M --data D --out {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmbeddingsError(f"{path} is not readable JSON ({e}); rerun `sslhub embed` with --overwrite") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EmbeddingsError(f"{path} is not an sslhub embeddings manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise EmbeddingsError(f"{path} has format version {manifest.get('version')!r}; this sslhub reads "
                              f"version {VERSION}: rerun `sslhub embed` with --overwrite")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing or manifest["dtype"] not in DTYPES or not isinstance(manifest["shards"], list):
        raise EmbeddingsError(f"{path} is malformed (missing {missing} or a bad dtype/shards); "
                              f"rerun `sslhub embed` with --overwrite")
    return manifest


def write_embedding_shard(folder: str | Path, name: str, array: np.ndarray, rows: Sequence[dict[str, Any]],
                          info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write shard ``name``: ``.npy`` and ``.jsonl`` (each atomically), then its done file; returns the latter.

    ``info`` adds fields to the done file (e.g. ``source``, ``seconds``, ``skipped``); ``source`` defaults to
    the first row's, ``seconds`` to the time this write took.
    """
    start = time.perf_counter()
    folder = Path(folder)
    array = np.ascontiguousarray(array)
    if array.ndim != 2 or len(array) != len(rows):
        raise EmbeddingsError(f"shard {name}: {array.shape} embeddings for {len(rows)} rows (need (N, dim), N = rows)")

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy" to the temp name
            np.save(f, array, allow_pickle=False)

    atomic_write(folder / f"{name}.npy", save)
    atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    done = {"count": int(len(array)), "source": rows[0].get("source") if rows else None,
            "sha256": _sha256(folder / f"{name}.npy"), "seconds": round(time.perf_counter() - start, 3)}
    done.update(info or {})
    atomic_write_text(folder / f"{name}.done.json", json.dumps(done) + "\n")
    return done


def shard_status(folder: str | Path, name: str, manifest: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Shard ``name``'s done record if the shard is finished (done file, count = npy shape, size agrees), else None."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    try:
        done = json.loads((folder / f"{name}.done.json").read_text())
        count = int(done["count"])
        npy = folder / f"{name}.npy"
        with open(npy, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if major == 1
                               else np.lib.format.read_array_header_2_0(f))
            header = f.tell()
        if shape != (count, int(manifest["dim"])) or dtype != np.dtype(manifest["dtype"]):
            return None
        if npy.stat().st_size != header + count * int(manifest["dim"]) * dtype.itemsize:
            return None
        if not (folder / f"{name}.jsonl").is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    return done


def finished_shards(folder: str | Path) -> list[str]:
    """The manifest's shards that are finished, in manifest order."""
    manifest = read_manifest(folder)
    return [n for n in manifest["shards"] if shard_status(folder, n, manifest) is not None]


def unfinished_shards(folder: str | Path) -> list[str]:
    manifest = read_manifest(folder)
    return [n for n in manifest["shards"] if shard_status(folder, n, manifest) is None]


def read_rows(folder: str | Path, name: str) -> list[dict[str, Any]]:
    path = Path(folder) / f"{name}.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_embedding_shards(folder: str | Path, mmap: bool = True, allow_partial: bool = False
                          ) -> Iterator[tuple[str, np.ndarray, list[dict[str, Any]]]]:
    """Yield ``(name, array (N, dim), rows)`` per finished shard, in manifest order.

    ``array`` is a read-only memmap when ``mmap``. Unless ``allow_partial``, a folder with unfinished shards
    raises :class:`UnfinishedEmbeddingsError` before anything is yielded.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    finished = [n for n in manifest["shards"] if shard_status(folder, n, manifest) is not None]
    if not allow_partial and len(finished) < len(manifest["shards"]):
        _raise_unfinished(folder, [n for n in manifest["shards"] if n not in set(finished)], len(manifest["shards"]))
    for name in finished:
        path = folder / f"{name}.npy"
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        rows = read_rows(folder, name)
        if len(rows) != len(array):
            raise EmbeddingsError(f"{folder / (name + '.jsonl')} has {len(rows)} rows for {len(array)} embeddings: "
                                  f"the folder was altered; rerun `sslhub embed` with --overwrite")
        yield name, array, rows


def count_embeddings(folder: str | Path, allow_partial: bool = False) -> int:
    """The number of embeddings in the folder's finished shards (from the done files; reads no arrays)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    total, unfinished = 0, []
    for name in manifest["shards"]:
        done = shard_status(folder, name, manifest)
        if done is None:
            unfinished.append(name)
        else:
            total += int(done["count"])
    if unfinished and not allow_partial:
        _raise_unfinished(folder, unfinished, len(manifest["shards"]))
    return total


def clean_temp_files(folder: str | Path) -> int:
    """Remove the temp files that writes cut short left in ``folder``; returns how many."""
    removed = 0
    for path in Path(folder).iterdir() if Path(folder).is_dir() else []:
        if path.is_file() and _TEMP.match(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _raise_unfinished(folder: Path, unfinished: list[str], total: int) -> None:
    shown = ", ".join(unfinished[:20]) + (f", ... ({len(unfinished)} in all)" if len(unfinished) > 20 else "")
    raise UnfinishedEmbeddingsError(
        f"{folder}: {len(unfinished)} of {total} embedding shards are not finished ({shown}); "
        f"rerun the same `sslhub embed` command to finish them (finished shards are skipped)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
