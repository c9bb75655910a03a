"""Pickle-free, atomic, checksummed checkpoints, the last K of a run kept.

Training state (model, optimisers, step, RNG-free metadata) is a nested structure of tensors and
JSON values; ``save_state`` stores the tensors in one safetensors file and the structure as JSON in
its metadata — nothing is ever unpickled on load.  Every write goes to a temporary file in the same
folder followed by ``os.replace``, so a crash mid-write leaves the previous checkpoint intact.

The header also holds a SHA-256 of the structure and of every tensor's bytes, verified by ``load_state``:
a file damaged after it was written (a zeroed tail, a bad disk block) is refused, never resumed silently.

A run keeps its checkpoints as ``checkpoints/step-NNNNNNN.safetensors`` (``checkpoint_path``), the newest
``train.keep_checkpoints`` of them (``prune``); ``list_checkpoints`` gives them newest first.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sslhub import formats
from sslhub.atomic import atomic_write
from sslhub.errors import SslhubError

_TENSOR = "__tensor__"


class CheckpointError(SslhubError, RuntimeError):
    pass


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{prefix}: only str/int keys can be checkpointed")
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot checkpoint a {type(obj).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def checksum(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the structure JSON and of every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256(structure.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state(path: str | Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_flatten(state, "", tensors))
    meta = {formats.CHECKPOINT_META_KEY: structure, formats.CHECKPOINT_SHA256_KEY: checksum(structure, tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:  # one pass: metadata and tensors
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable sslhub checkpoint ({e})") from None
    if formats.CHECKPOINT_META_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not an sslhub training checkpoint")
    structure = meta[formats.CHECKPOINT_META_KEY]
    expected = meta.get(formats.CHECKPOINT_SHA256_KEY)  # absent in checkpoints of sslhub < 0.3: not checked
    if expected is not None and checksum(structure, tensors) != expected:
        raise CheckpointError(f"{path}: damaged (its SHA-256 checksum does not match the one written with it)")
    return _unflatten(json.loads(structure), tensors)


def read_info(path: str | Path) -> dict:
    """The plain (non-tensor) top-level entries of a checkpoint (``step``, ``elapsed``, ``recipe``), read from
    its header alone: no tensor is loaded."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable sslhub checkpoint ({e})") from None
    if formats.CHECKPOINT_META_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file, but not an sslhub training checkpoint")
    structure = json.loads(meta[formats.CHECKPOINT_META_KEY])
    return {k: v for k, v in structure.get("__dict__", []) if not isinstance(v, dict)}


# ---------------------------------------------------------------------- a run's checkpoints
_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step-{step:07d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The run's checkpoints in ``folder``, newest (highest step) first; a ``last.safetensors`` written by
    sslhub < 0.3 counts as the oldest."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))),
                   reverse=True)
    legacy = folder / "last.safetensors"
    return [p for _, p in found] + ([legacy] if legacy.is_file() else [])


def prune(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
    old = list_checkpoints(folder)[keep:]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def iter_infos(folder: str | Path) -> Iterator[tuple[Path, dict]]:
    """``(path, read_info(path))`` for each readable checkpoint, newest first (headers only)."""
    for p in list_checkpoints(folder):
        try:
            yield p, read_info(p)
        except CheckpointError:
            continue
