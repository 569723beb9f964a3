"""Metrics: a JSONL log written by rank 0, mirrored to DeepSpeed's monitors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL of training and evaluation lines (rank 0 only).

    On resume from step k, lines past k (logged after the checkpoint that is now being
    resumed) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None = None, monitor: Any = None):
        self.path = out_dir / METRICS_FILE
        self.enabled = enabled
        # DeepSpeed's MonitorMaster (TensorBoard, CSV, W&B, Comet as its config enables):
        # every numeric field is mirrored there, against the optimizer step.
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None:
            group = "eval" if "val_loss" in record else "train"
            self.monitor.write_events([(f"{group}/{key}", float(value), record["step"]) for key, value in record.items()
                                       if key != "step" and isinstance(value, (int, float))])
