"""BENCHMARKS.md is assembled from sections, one per benchmark, each rewritten by its own script."""
from __future__ import annotations

import datetime
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
