"""A run folder's life across runs: never replaced silently, continued only with its own recipe, and on
``--resume`` the newest intact, healthy checkpoint chosen (the others moved aside, kept)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sslhub import formats
from sslhub.errors import SslhubError
from sslhub.train.checkpoint import CheckpointError, iter_infos, list_checkpoints, load_state, read_info
from sslhub.train.guard import health

log = logging.getLogger("sslhub.train")

RUN_FILES = (formats.RUN_RECIPE, formats.RUN_CHECKPOINTS, formats.RUN_EXPORT, formats.RUN_METRICS_CSV,
             formats.RUN_METRICS_JSON, formats.RUN_CURVES, formats.RUN_TENSORBOARD)

# recipe keys that may change when a run is resumed: how long, how often to log or save, evaluation, threads,
# and what continuing a diverged run needs (a lower learning rate, clipping, fp32)
RESUMABLE = ("train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
             "train.threads", "train.device", "data.num_workers", "eval.", "optim.lr", "optim.clip_grad",
             "train.precision", "train.parallel")


def recipe_changes(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf value that differs between two recipe dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in dict.fromkeys([*old, *new])
                for c in recipe_changes(old.get(k), new.get(k), f"{key}.{k}" if key else k)]
    return [] if old == new else [(key, old, new)]


def check_run_folder(out: Path, recipe: dict, resume: bool, overwrite: bool) -> None:
    """A folder that holds a run is continued (``--resume``, with the recipe it was started with) or replaced
    (``--overwrite``), never silently; checked before any data is read."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise SslhubError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                          "--overwrite to replace it, or give another --out")
    newest = next(iter_infos(out / formats.RUN_CHECKPOINTS), None) if resume else None
    if newest is None:
        return
    path, info = newest
    saved = json.loads(info.get("recipe") or "{}")
    changed = [f"{k}: {a!r} → {b!r}" for k, a, b in recipe_changes(saved, recipe) if not k.startswith(RESUMABLE)]
    if changed:
        raise SslhubError(f"{path} was written by a run with another recipe ({'; '.join(changed[:6])}"
                          f"{' …' if len(changed) > 6 else ''}): --resume continues a run with its own recipe "
                          "(only its length, logging, checkpointing, evaluation, optim.lr, optim.clip_grad and "
                          "train.precision may change); start a new run with --overwrite or another --out")


def clear_run_folder(out: Path) -> None:
    """--overwrite: the earlier run's files go, so no old checkpoint can be resumed under the new recipe."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def newest_usable(ckpt_dir: Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest checkpoint that is intact (checksum) and healthy, its state, and the newer ones passed over
    with the reason; an error naming every reason when none is usable."""
    passed: list[tuple[Path, str]] = []
    for path in list_checkpoints(ckpt_dir):
        try:
            why = health(read_info(path))  # from the header: a diverging checkpoint's tensors are never read
            if not why:
                return path, load_state(path), passed  # the checksum is verified here
        except CheckpointError as e:
            why = str(e).removeprefix(f"{path}: ")
        passed.append((path, why))
    reasons = "; ".join(f"{p}: {why}" for p, why in passed)
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be resumed ({reasons}); start the run again "
                          "with --overwrite")


def reject(out: Path, passed: list[tuple[Path, str]]) -> None:
    """Move checkpoints --resume passed over to checkpoints/rejected/ (kept, never resumed or pruned)."""
    if not passed:
        return
    folder = out / formats.RUN_REJECTED
    folder.mkdir(parents=True, exist_ok=True)
    for path, _ in passed:
        dest, n = folder / path.name, 1
        while dest.exists():  # rejected before, by an earlier --resume: both kept
            n += 1
            dest = folder / f"{path.stem}.{n}{path.suffix}"
        path.replace(dest)
    reasons = "; ".join(f"{p.name}: {why}" for p, why in passed[:3]) + (" …" if len(passed) > 3 else "")
    log.warning("--resume passed over %d newer checkpoint(s) (%s): moved to %s", len(passed), reasons, folder)
