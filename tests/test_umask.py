"""Atomic writes give files and folders the user's umask, as a plain ``open``/``mkdir`` does (not tempfile's 0600/0700):
an export, index or checkpoint is readable by another user or container UID when the umask allows it."""
import os
import stat

import numpy as np
import pytest

from sslhub.atomic import atomic_write, atomic_write_text, replace_folder
from sslhub.inference.retrieval import build_index


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write(tmp_path / "sub" / "b.bin", lambda tmp: open(tmp, "wb").write(b"\0"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "sub" / "b.bin") == mode(plain) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "plain.txt", "sub"]  # no temporary left


def test_folders_get_the_umask(tmp_path, umask):
    def build(tmp):
        (tmp / "weights.bin").write_bytes(b"\0")
        (tmp / "nested").mkdir()

    for _ in range(2):  # a new folder, then one swapped over the old
        out = replace_folder(tmp_path / "export", build)
        assert mode(out) == mode(out / "nested") == 0o777 & ~umask
        assert mode(out / "weights.bin") == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_saved_index_is_readable_as_the_umask_allows(tmp_path, umask):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = build_index(x, kind="flat", progress=False).save(tmp_path / "index")
    assert mode(path) == 0o777 & ~umask
    assert {mode(f) for f in path.iterdir()} == {0o666 & ~umask}


def test_safetensors_exports_and_checkpoints_get_the_umask(tmp_path, umask):
    """safetensors' save_file makes its file 0600 whatever the umask: the export and checkpoint writers fix it."""
    import torch
    from safetensors.torch import save_file

    from sslhub.train.checkpoint import save_state

    # the export writer's build step: safetensors' save_file into the folder built aside
    folder = replace_folder(tmp_path / "export", lambda tmp: save_file({"w": torch.zeros(2)}, tmp / "model.safetensors"))
    save_state(tmp_path / "ckpt.safetensors", {"model": {"w": torch.zeros(2)}, "step": 1})
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")  # what the writers would give on their own
    assert mode(folder / "model.safetensors") == mode(tmp_path / "ckpt.safetensors") == 0o666 & ~umask
    assert mode(folder) == 0o777 & ~umask
