"""Run logs: ``metrics.csv`` (one row per epoch, rewritten atomically) and TensorBoard scalars."""

from __future__ import annotations

import csv
import io
import os
import sys
from typing import Optional

from qformat.io import atomic_write


class RunLogger:
    """CSV + TensorBoard on rank 0; a no-op elsewhere so call sites need no rank checks."""

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True, resume_epoch: int = 0,
                 resume_step: int = 0, resume_rows: Optional[list] = None):
        self.enabled, self.out_dir = enabled, out_dir
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if resume_rows is not None:  # the rows committed with the resume state: the CSV may be an epoch behind
            self.rows = [dict(r) for r in resume_rows]
            self.write_csv()
        elif resume_epoch > 0 and os.path.isfile(self.csv_path):  # a state from before rows were stored in it
            with open(self.csv_path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r.get("epoch", 0)) <= resume_epoch]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, drop events logged after the checkpoint (the interrupted epoch's tail)
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step or None)
            except ImportError as e:  # tensorboard is optional at run time
                sys.stderr.write("warning: TensorBoard logging off ({})\n".format(e))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def epoch(self, row: dict) -> None:
        """Append one epoch's metrics and rewrite the CSV (small file, atomic, never half-written)."""
        if not self.enabled:
            return
        self.rows.append(row)
        self.write_csv()
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)):
                self.scalar("epoch/" + k, v, int(row.get("epoch", 0)))

    def write_csv(self) -> None:
        write_metrics_csv(self.csv_path, self.rows)

    def close(self, final: Optional[dict] = None) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def write_metrics_csv(path: str, rows: list) -> None:
    """One row per epoch, columns in first-seen order; rewritten atomically (small file, never half-written)."""
    if not rows:
        return
    keys: list = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode("utf-8"))
