"""Plots written next to a run: training curves from metrics.csv (matplotlib, optional extra)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from sslhub import formats

log = logging.getLogger("sslhub.train.plots")
SKIP = {"step", "epoch"}


def plot_curves(metrics_csv: str | Path, out: str | Path | None = None) -> Path | None:
    """One panel per logged quantity (loss, lr, throughput, …) against the step; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no training-curve plot (pip install 'sslhub[logging]')")
        return None
    metrics_csv = Path(metrics_csv)
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    keys = [k for k in rows[0] if k not in SKIP]
    steps = [float(r["step"]) for r in rows]
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(s, float(r[key])) for s, r in zip(steps, rows) if r.get(key) not in (None, "")]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.4)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out) if out else metrics_csv.with_name(formats.RUN_CURVES)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
