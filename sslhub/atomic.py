"""Atomic writes of files and folders: a reader sees the old version or the new one, never half of either.

    atomic_write(path, lambda tmp: save_file(tensors, tmp))     # a file: written aside, fsynced, os.replace
    atomic_write_text(path, text)
    replace_folder(folder, build)                               # a folder: built aside by build(tmp), swapped in

A folder is swapped with Linux ``renameat2(RENAME_EXCHANGE)`` in one step where the kernel has it; elsewhere
two renames leave ``folder`` absent for an instant (never half-written). Every file of a new folder is on
disk (fsync) before the swap. Used for checkpoints, exports, indexes and caches.

The new file or folder gets the permissions a plain ``open(path, "w")`` or ``mkdir`` would give it
(0644 / 0755 under umask 022): an export or index is readable by whoever may read its parent folder.  That
holds whatever the writer does: safetensors' ``save_file`` creates its file 0600, so every file written is
given the umask's mode before it is moved into place.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(_new_sibling(path, ".tmp", _create_file))
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def replace_folder(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a folder next to ``final`` with ``build(tmp)`` and swap it in; returns ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(final, "", os.mkdir)
    try:
        build(tmp)
        umask = _umask()
        for f in tmp.rglob("*"):  # on disk before the swap, with the modes open() and mkdir() would give
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir() and not f.is_symlink():
                os.chmod(f, 0o777 & ~umask)
        _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build, or the old folder after the swap
    return final


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and set it back at once
    os.umask(mask)
    return mask


def _create_file(path: Path) -> None:
    """An empty new file (``FileExistsError`` if taken), mode 0o666 less the umask, as ``open(path, "w")`` gives."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_sibling(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create a hidden ``.NAME.<random><suffix>`` next to ``path`` with ``create`` and return it.

    ``create`` (``_create_file``, ``os.mkdir``) raises ``FileExistsError`` when the name is taken and
    lets the umask set the mode; ``tempfile``'s mkstemp/mkdtemp would give 0600/0700, leaving every
    export and index unreadable to other users.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            create(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def _swap_in(new: Path, dest: Path) -> None:
    """Put folder ``new`` at ``dest``; the old ``dest``, if any, ends up at ``new``."""
    if not dest.exists():
        os.replace(new, dest)
        return
    try:
        at_fdcwd, rename_exchange = -100, 2
        if ctypes.CDLL(None).renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(dest), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    old = new.with_name(new.name + ".old")
    os.replace(dest, old)
    os.replace(new, dest)
    os.replace(old, new)  # the caller's cleanup of ``new`` removes it
