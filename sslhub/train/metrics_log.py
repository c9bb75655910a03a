"""metrics.csv and TensorBoard: one row per ``train.log_every`` steps, cut back to the checkpoint on resume."""
from __future__ import annotations

import csv
from pathlib import Path

from sslhub import formats


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
