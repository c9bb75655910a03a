"""The sslhub demo from a source checkout: ``python demos/app.py [MODEL [--index I | --data D] ...]``.

With arguments it is ``sslhub demo`` (same flags: ``--split``, ``--port``, ``--host``, ``--share``). With
none it serves the quickstart model (``make quickstart`` writes runs/quickstart/export) over the bundled
CIFAR-10 sample's test split, so its few-shot and nearest-neighbour tabs work on first launch.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sslhub.apps.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "runs" / "quickstart" / "export"


def quickstart_args() -> list[str]:
    """``sslhub demo`` arguments for the quickstart model over data/cifar10-sample (test split)."""
    if not QUICKSTART.is_dir():
        sys.exit(f"no model given and {QUICKSTART} does not exist: run `make quickstart` first, or pass a "
                 "model, e.g. python demos/app.py open_clip:ViT-B-32/laion2b_s34b_b79k --data data/flickr8k-sample")
    return [str(QUICKSTART), "--data", str(REPO / "data" / "cifar10-sample"), "--split", "test"]


if __name__ == "__main__":
    sys.exit(main(["demo", *(sys.argv[1:] or quickstart_args())]))
