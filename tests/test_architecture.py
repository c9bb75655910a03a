"""The package's shape: one-way imports, no load-bearing function-level imports, a light ``import sslhub``.

The import contracts themselves (no cycles, layers, inference ∌ training, methods ∌ loaders) are in
pyproject.toml and checked by ``lint-imports`` in ``make test``; ``test_import_contracts_hold`` runs
the same check so a plain ``pytest`` sees it too.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sslhub"
SHIMS = {"sslhub.zeroshot", "sslhub.retrieval", "sslhub.hub", "sslhub.trainer"}  # moved-module aliases (warn)
# third-party libraries that only some extras install, or heavy ones kept out of `import sslhub`:
# imported inside the functions that need them
OPTIONAL = ("open_clip", "transformers", "faiss", "gradio", "gradio_client", "matplotlib", "sklearn",
            "torch.utils.tensorboard", "lightly", "huggingface_hub", "timm", "safetensors", "PIL",
            "httpx2")  # huggingface_hub's HTTP client, imported with it


def all_modules() -> list[str]:
    mods = []
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue
        mods.append(".".join(parts))
    return mods


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("order", ["alphabetical", "reverse"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    """No module depends on another having been imported first (what a hidden import cycle needs)."""
    mods = [m for m in all_modules() if m not in SHIMS]
    if order == "reverse":
        mods = mods[::-1]
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(len(sys.modules)))")
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    found.append((sub.lineno, "." * sub.level + (sub.module or "")))
                elif isinstance(sub, ast.Import):
                    found.extend((sub.lineno, a.name) for a in sub.names)
    return found


def test_function_level_imports_are_optional_libraries_only():
    """sslhub's own modules are imported at the top of each file, so the import graph is the whole truth;
    only optional third-party libraries (an extra may not install them) wait inside functions."""
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        for line, mod in function_level_imports(f):
            if mod.startswith(".") or mod == "sslhub" or mod.startswith("sslhub."):
                bad.append(f"{f.relative_to(REPO)}:{line}: {mod}")
            elif not (mod.startswith(OPTIONAL) or mod in ("importlib",)) and mod.split(".")[0] not in sys.stdlib_module_names:
                bad.append(f"{f.relative_to(REPO)}:{line}: {mod} (a required dependency: import it at the top)")
    assert not bad, "function-level imports:\n" + "\n".join(bad)


def test_import_sslhub_loads_inference_only():
    r = run_python("import json, sys, sslhub\n"
                   "from sslhub import load_encoder, Encoder, LoadError, SslhubError\n"
                   "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('sslhub', 'faiss', 'gradio')))))")
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    training = [m for m in loaded if m.startswith(("sslhub.train", "sslhub.methods", "sslhub.apps", "sslhub.publish"))]
    assert not training, f"import sslhub loaded the training/app side: {training}"
    assert not [m for m in loaded if m.startswith(("faiss", "gradio"))], loaded


def test_top_level_api():
    r = run_python("import sslhub\n"
                   "from sslhub import load_encoder, ZeroShotClassifier, build_index, load_index, push_to_hub\n"
                   "from sslhub.inference.zeroshot import ZeroShotClassifier as Z\n"
                   "from sslhub.inference.retrieval import build_index as B\n"
                   "assert ZeroShotClassifier is Z and build_index is B\n"
                   "assert set(sslhub.__all__) <= set(dir(sslhub))\n"
                   "try:\n    sslhub.no_such_name\nexcept AttributeError as e:\n    print('ok', e)\n")
    assert r.returncode == 0, r.stderr
    assert "ok module 'sslhub' has no attribute 'no_such_name'" in r.stdout


def test_moved_modules_still_import_with_a_warning():
    r = run_python("import warnings\n"
                   "with warnings.catch_warnings(record=True) as w:\n"
                   "    warnings.simplefilter('always')\n"
                   "    from sslhub.zeroshot import ZeroShotClassifier\n"
                   "    from sslhub.hub import push_to_hub\n"
                   "    from sslhub.retrieval import build_index\n"
                   "    from sslhub.trainer import train\n"
                   "print(sorted(str(x.message).split(' ')[0] for x in w if x.category is DeprecationWarning))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['sslhub.hub', 'sslhub.retrieval', 'sslhub.trainer', 'sslhub.zeroshot']"


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'sslhub[test]')")
    r = subprocess.run([exe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "0 broken" in r.stdout
