"""Packaging matches the imports: the built wheel, installed non-editable in a fresh venv with one extra.

- the wheel carries every non-.py file under sslhub/ (the bundled CLIP architectures, clip_configs/*.json);
- ``sslhub[clip]`` alone trains a bundled CLIP architecture and evaluates it (zero-shot + image–text
  retrieval) through the ``sslhub`` command, from a folder where the source tree is not importable;
- ``sslhub[demo]`` alone serves the demo of a (tiny) vision-only sslhub export.

Each fresh venv gets ``torch==2.14.1 torchvision==0.29.1`` first (the local wheel store), then the wheel
with its extra. pip's cache is used, so a second run is quicker. The wheel is built from a copy of
pyproject.toml, README.md and sslhub/ so the build writes no build/ or egg-info into the working tree
and no stale build/lib can leak into the wheel. Phase times are printed (``pytest -s`` shows them).

The two fresh-venv tests are ``slow`` (about 10 minutes on 2 cores: each venv unpacks torch and its CUDA
wheels, ~90 s, and pip's HTTP cache does not help against this registry, whose files carry no cache
headers): ``pytest -m slow tests/test_wheel.py``. The wheel-contents check runs in the default tier.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import stop_process

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sslhub"
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
INSTALL_TIMEOUT = 1500  # a cold pip cache: torch, its CUDA wheels, gradio, open_clip, transformers


def phase(name: str, t0: float) -> None:
    print(f"[test_wheel] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def data_files(root: Path) -> set[str]:
    """Package-relative paths of the files under sslhub/ that are not Python sources or caches."""
    return {p.relative_to(root.parent).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="sslhub-wheel-"))  # outside the repo; the venvs are GBs: removed after
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir) -> Path:
    t0 = time.perf_counter()
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(PKG, src / "sslhub", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = workdir / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src]
    if importlib.util.find_spec("setuptools") is not None:  # this interpreter's setuptools: no download
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:  # pyproject's build-system requires
            cmd.insert(4, "--no-build-isolation")
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600)
    if r.returncode and "No module named pip" in r.stderr:
        pytest.skip(f"pip is not available to {sys.executable}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (whl,) = out.glob("sslhub-*.whl")
    phase("build wheel", t0)
    return whl


def fresh_venv(path: Path) -> Path:
    """A new venv (no system site-packages) with torch installed; returns its bin folder."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True, timeout=300)
    if r.returncode:
        pytest.skip(f"python -m venv is not available: {(r.stderr or r.stdout).strip()[-500:]}")
    bin_ = path / "bin"
    if subprocess.run([bin_ / "python", "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("the fresh venv has no pip (ensurepip missing)")
    phase(f"{path.name}: python -m venv", t0)
    t0 = time.perf_counter()
    pip_install(bin_, *TORCH)
    phase(f"{path.name}: pip install {' '.join(TORCH)}", t0)
    return bin_


def pip_install(bin_: Path, *reqs: str) -> None:
    # --no-compile: byte-compiling all of torch takes long and changes nothing that is checked here
    run([bin_ / "python", "-m", "pip", "install", "-q", "--no-compile", "--progress-bar", "off", *reqs],
        timeout=INSTALL_TIMEOUT, env=clean_env(bin_))


def clean_env(bin_: Path) -> dict:
    """The environment of the fresh venv: its bin first on PATH, nothing of this repo or its .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(REPO))]
    env.update(PATH=os.pathsep.join([str(bin_), *path]), VIRTUAL_ENV=str(bin_.parent), PIP_NO_INPUT="1",
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return env


def install_wheel(workdir: Path, name: str, wheel: Path, extra: str) -> tuple[Path, Path]:
    """Fresh venv ``name`` with torch, then ``wheel[extra]``; returns (bin, a working folder outside the repo)."""
    bin_ = fresh_venv(workdir / name)
    t0 = time.perf_counter()
    pip_install(bin_, f"{wheel}[{extra}]")
    phase(f"{name}: pip install sslhub-*.whl[{extra}]", t0)
    cwd = workdir / f"{name}-cwd"
    cwd.mkdir()
    assert not (cwd / "sslhub").exists() and REPO not in cwd.parents
    r = run([bin_ / "python", "-c", "import json, sslhub, sslhub.methods.clip as c; "
                                    "print(json.dumps([sslhub.__file__, str(c.CONFIG_DIR)]))"],
            timeout=300, cwd=cwd, env=clean_env(bin_))
    file, config_dir = json.loads(r.stdout.strip().splitlines()[-1])
    site = (workdir / name).resolve()
    assert Path(file).resolve().is_relative_to(site), f"sslhub imported from {file}, not from the venv {site}"
    assert Path(config_dir).resolve().is_relative_to(site)
    return bin_, cwd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wheel_ships_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"sslhub/methods/clip_configs/{p.name}" for p in (PKG / "methods" / "clip_configs").glob("*.json")}
    assert configs, "no bundled CLIP configs in the source tree"
    assert configs <= names, f"missing from the wheel: {sorted(configs - names)}"
    missing = data_files(PKG) - names  # anything else non-.py that sslhub/ holds
    assert not missing, f"files under sslhub/ that the wheel lacks (add them to package-data): {sorted(missing)}"
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "webdataset" not in meta  # no dependency that nothing imports


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_clip_extra_trains_and_evaluates_from_the_wheel(wheel, workdir):
    bin_, cwd = install_wheel(workdir, "venv-clip", wheel, "clip")
    assert (bin_ / "sslhub").is_file()  # the console script
    r = run([bin_ / "python", "-c", "import importlib.util as u; print(u.find_spec('faiss') is None)"],
            timeout=120, cwd=cwd, env=clean_env(bin_))
    assert r.stdout.strip() == "True", "sslhub[clip] installed faiss: this no longer shows CLIP evaluation runs without it"
    t0 = time.perf_counter()
    out = cwd / "run"
    sets = [
        "encoder.arch=sslhub-clip-vit-tiny",  # bundled: read from clip_configs/ inside the installed package
        "encoder.image_size=32", "method_args.views.size=32",
        "data.batch_size=16", "data.num_workers=0", "train.max_steps=2", "train.log_every=1",
        f"data.train={REPO / 'data/flickr8k-sample'}",
        f"eval.zeroshot=[{{data: {REPO / 'data/cifar10-sample'}, split: test, templates: cifar}}]",
        f"eval.retrieval.data={REPO / 'data/flickr8k-sample'}",
    ]
    r = run([bin_ / "sslhub", "train", REPO / "recipes/clip_flickr8k.yaml", "--out", out, "--no-progress",
             *sum((["--set", s] for s in sets), [])], timeout=900, cwd=cwd, env=clean_env(bin_))
    phase("venv-clip: sslhub train + zero-shot + retrieval (2 steps)", t0)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    export = Path(res["export"])
    assert export.resolve() == (out / "export").resolve() and res["steps"] == 2
    assert (export / "open_clip_config.json").is_file() and (export / "open_clip_model.safetensors").is_file()
    cfg = json.loads((export / "open_clip_config.json").read_text())
    assert cfg["sslhub"]["architecture"] == "sslhub-clip-vit-tiny"
    (zs,) = res["zeroshot"]
    assert zs["classes"] == 10 and 0 <= zs["top1"] <= 100
    ret = res["retrieval"]
    assert ret["images"] == 100 and ret["captions"] == 500
    for way in ("image_to_text", "text_to_image"):
        assert set(ret[way]) == {"R@1", "R@5", "R@10"} and all(0 <= v <= 100 for v in ret[way].values())


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_extra_serves_the_demo_from_the_wheel(wheel, workdir):
    bin_, cwd = install_wheel(workdir, "venv-demo", wheel, "demo")
    env = clean_env(bin_)
    t0 = time.perf_counter()
    r = run([bin_ / "sslhub", "train", REPO / "recipes/simclr_cifar10.yaml", "--out", cwd / "run", "--no-progress",
             "--set", f"data.train={REPO / 'data/cifar10-sample'}", "--set", "encoder.model_args.channels=[8,16,16,16]",
             "--set", "data.batch_size=16", "--set", "data.num_workers=0", "--set", "train.max_steps=1",
             "--set", "optim.warmup_epochs=0", "--set", "eval.knn.test="], timeout=600, cwd=cwd, env=env)
    export = Path(json.loads(r.stdout.strip().splitlines()[-1])["export"])
    phase("venv-demo: tiny sslhub train (1 step)", t0)

    t0 = time.perf_counter()
    port = free_port()
    log = (cwd / "demo.log").open("w")
    proc = subprocess.Popen([str(bin_ / "sslhub"), "demo", str(export), "--data", str(REPO / "data/cifar10-sample"),
                             "--split", "test", "--port", str(port)], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    status, deadline = None, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    status = resp.status
                    page = resp.read(200_000).decode("utf-8", "replace")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
    finally:
        stop_process(proc)
        log.close()
    phase("venv-demo: sslhub demo start → HTTP 200", t0)
    assert status == 200, f"the demo did not answer (exit {proc.returncode}):\n{(cwd / 'demo.log').read_text()[-5000:]}"
    assert "gradio" in page.lower()
