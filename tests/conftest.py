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

# The same for a ViT recipe (masked modeling; DINO / MoCo v3 on a ViT): one narrow block, 4-px patches on 32-px
# images (an 8x8 grid, so SimMIM's mask cells of 2x2 patches make a 4x4 grid).
TINY_VIT = [
    "encoder.image_size=32",
    "encoder.model_args={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
    "data.batch_size=32",
    "data.num_workers=0",
    "train.log_every=1",
    "method_args.views.size=32",
]
TINY_VIT_ENCODER = {"arch": "vit_tiny_patch16_224", "image_size": 16,
                    "model_args": {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}}


def tiny(recipe) -> list[str]:
    """The tiny-encoder overrides for ``recipe``: TINY for a CNN, TINY_VIT for a ViT."""
    return TINY_VIT if recipe.encoder.arch.startswith("vit") else TINY


torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_data(name: str) -> Path:
    path = SHARED / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"needs {path} (the real data of the shared data folder), absent here")
    return path


def run_cli(*args: str) -> dict:
    """Run ``sslhub ARGS`` in-process; return its last-line JSON."""
    import io
    import json
    from contextlib import redirect_stdout

    from sslhub.apps.cli import main

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


@pytest.fixture(scope="session")
def open_clip_folder(tmp_path_factory):
    """A tiny open_clip CLIP (registered architecture) saved in open_clip's Hub layout.

    Returns (folder, model, preprocess, tokenizer) — the model as open_clip itself built it.
    """
    import json

    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    cfg_dir = tmp_path_factory.mktemp("oc_cfg")
    (cfg_dir / "sslhub-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir / "sslhub-test-tiny-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("sslhub-test-tiny-clip")
    model.eval()
    folder = tmp_path_factory.mktemp("open_clip")
    pp = {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, model, preprocess, open_clip.get_tokenizer("sslhub-test-tiny-clip")


def stop_process(proc) -> None:
    """Terminate a server started by a test; kill it if it has not exited within 30 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
