"""BENCHMARKS.md is assembled from sections, one per benchmark, each rewritten by its own script."""
from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

HEADER = "# Benchmarks\n\nEvery figure below is written by the script named in its section; rerun it to refresh.\n"


def update_section(path: Path, key: str, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    block = f"<!-- {key}:start -->\n## {title}\n\n_Measured {stamp}._\n\n{body}\n<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(key)}:start -->.*?<!-- {re.escape(key)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo and whether it has bf16 matmul units."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                bf16 = "with" if ("avx512_bf16" in info or "amx_bf16" in info) else "without"
                return f"{line.split(':', 1)[1].strip()} ({bf16} AVX512-BF16/AMX)"
    except OSError:
        pass
    return platform.processor() or platform.machine()
