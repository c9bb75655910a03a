"""A run's metrics: metrics.csv and TensorBoard (one row per ``train.log_every`` steps, cut back to the
checkpoint on resume), and the training curves drawn from them (matplotlib, an optional extra)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from sslhub import formats

log = logging.getLogger("sslhub.train")


class MetricsLog:
    """metrics.csv (+ TensorBoard when installed).  On resume, rows past the checkpoint are dropped."""

    def __init__(self, out: Path, start: int, enabled: bool = True):
        self.enabled = enabled
        self.path = out / formats.RUN_METRICS_CSV
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path) as f:
                self.rows = [row for row in csv.DictReader(f) if int(float(row["step"])) <= start]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / formats.RUN_TENSORBOARD), purge_step=start or None)
        except ImportError:  # tensorboard is an optional extra
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        if keys == getattr(self, "_keys", None):  # same columns: append the row
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, keys).writerow(row)
        else:  # first row, a resumed file or a new column: write it whole
            self._keys = keys
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows(self.rows)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", float(v), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
