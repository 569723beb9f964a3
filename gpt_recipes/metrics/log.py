"""Metrics: a JSONL log written by rank 0, mirrored to DeepSpeed's monitors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from gpt_recipes.checkpoints.paths import METRICS
from gpt_recipes.errors import UserError


def read_metrics(path: Path, warn: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short (the run was killed while writing it)
    is dropped, with a warning; a broken line anywhere else is an error."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                        "is it a metrics.jsonl the recipes wrote?")
    except OSError as err:
        raise UserError(f"{path} cannot be read: {err.strerror}")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                warn(f"{path}: dropped its last line, which was cut short (the run was stopped while writing it)")
                break
            raise UserError(f"{path} line {number} is not valid JSON")
    return records


class MetricsLog:
    """Append-only JSONL of training and evaluation lines (rank 0 only).

    On resume from step k, lines past k (logged after the checkpoint that is now being
    resumed) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None = None, monitor: Any = None):
        self.path = out_dir / METRICS
        self.enabled = enabled
        # DeepSpeed's MonitorMaster (TensorBoard, CSV, W&B, Comet as its config enables):
        # every numeric field is mirrored there, against the optimizer step.
        self.monitor = monitor if monitor is not None and monitor.enabled else None
        if not enabled:
            return
        kept: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None:
            group = "eval" if any(key.startswith("val_") for key in record) else "train"
            self.monitor.write_events([(f"{group}/{key}", float(value), record["step"]) for key, value in record.items()
                                       if key != "step" and isinstance(value, (int, float))])


def log_wandb_by_step(monitor: Any) -> None:
    """Send DeepSpeed's W&B monitor one row per event list, each against its own x-axis.

    DeepSpeed logs its own events against samples seen (step 8, 16, ...) and these recipes log
    theirs against the optimizer step, both with wandb.log(step=...); W&B drops every row whose
    step is below one it has seen ("Steps must be monotonically increasing"), so the recipe's
    metrics after DeepSpeed's first event were lost. Each axis becomes a logged field instead.
    """
    writer = getattr(monitor, "wandb_monitor", None)
    if writer is None or not writer.enabled:
        return
    import wandb

    wandb.define_metric("samples")
    wandb.define_metric("Train/Samples/*", step_metric="samples")
    wandb.define_metric("optimizer_step")
    for group in ("train", "eval"):
        wandb.define_metric(f"{group}/*", step_metric="optimizer_step")

    def write_events(events: list[tuple[str, float, int]]) -> None:
        for axis, rows in (("samples", [e for e in events if e[0].startswith("Train/Samples")]),
                           ("optimizer_step", [e for e in events if not e[0].startswith("Train/Samples")])):
            if rows:
                wandb.log({axis: rows[0][2], **{label: value for label, value, _ in rows}})

    writer.write_events = write_events
