"""Pickle-free, atomic checkpoints.

Training state (model, optimisers, step, RNG-free metadata) is a nested structure of tensors and
JSON values; ``save_state`` stores the tensors in one safetensors file and the structure as JSON in
its metadata — nothing is ever unpickled on load.  Every write goes to a temporary file in the same
folder followed by ``os.replace``, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def save_state(path: str | Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    meta = {"sslhub_state": json.dumps(structure)}
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
    return _unflatten(json.loads(meta[formats.CHECKPOINT_META_KEY]), tensors)


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
