from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10-sample"
SHARED = Path(os.environ.get("SSLHUB_SHARED_DATA", REPO.parent / "shared" / "data"))

# A narrow ResNet-18 (CIFAR stem) and small batches keep training tests to seconds on 2 cores.
TINY = [
    "encoder.model_args.channels=[16,32,64,128]",
    "data.batch_size=32",
    "data.num_workers=0",
    "train.log_every=1",
    "method_args.views.size=32",
]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data(name: str) -> Path:
    path = SHARED / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"needs {path} (the real data in ../shared/data), absent here")
    return path


def run_cli(*args: str) -> dict:
    """Run ``sslhub ARGS`` in-process; return its last-line JSON."""
    import io
    import json
    from contextlib import redirect_stdout

    from sslhub.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(args))
    assert rc == 0, f"sslhub {' '.join(args)} exited {rc}"
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def python() -> str:
    return sys.executable


@pytest.fixture
def tmp_run(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
