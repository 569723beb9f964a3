"""Summaries of runs from their metrics.jsonl: throughput, MFU, memory, loss; tables and plots.

Warm-up is left out of every throughput figure: by default the log lines up to 10% of
the run's steps (at least the first line), which hold DeepSpeed's first steps, the JIT
builds' last effects and the allocator's growth.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from gpt_recipes.checkpoints.paths import METRICS
from gpt_recipes.errors import UserError
from gpt_recipes.metrics.log import read_metrics


@dataclass(frozen=True)
class Column:
    """A summary table column: `value(lines, measured)` from a run's metrics lines and those past
    warm-up (None where the run has no such figure), written with `fmt`."""

    key: str
    header: str
    value: Callable[[list[dict[str, Any]], list[dict[str, Any]]], Any]
    fmt: Callable[[Any], str]


@dataclass(frozen=True)
class Curve:
    """A plot of a training figure (a line) and its held-out counterpart (dots) against `x`."""

    file: str
    title: str
    ylabel: str
    x: str
    train: tuple[str, str]  # (metrics key, label)
    evaluated: tuple[str, str]


@dataclass(frozen=True)
class Report:
    """What the summariser shows of an objective's runs (train/objective.py: each objective has one)."""

    columns: tuple[Column, ...] = ()
    curves: tuple[Curve, ...] = ()


@dataclass
class RunSummary:
    name: str
    steps: int
    measured_lines: int  # log lines after warm-up
    tokens_per_sec: float | None  # median over the measured lines (global)
    tokens_per_sec_p10: float | None
    tokens_per_sec_p90: float | None
    samples_per_sec: float | None
    step_time_ms: float | None
    tflops_per_rank: float | None
    mfu: float | None
    peak_mem_mb: float | None
    model_state_mb: float | None
    activation_mb: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    compile_s: float | None = None  # torch.compile's time, kept out of the throughput figures
    task_scores: dict[str, float] | None = None  # the last downstream evaluation (--eval_tasks)
    val_loss_by_source: dict[str, float] | None = None  # a mixture's last evaluation, per source
    # The objectives' own figures (their Report's columns) that this run has, by column key.
    objective: dict[str, Any] = field(default_factory=dict)
    objective_columns: list[Column] = field(default_factory=list)


def metrics_path(run_dir: Path) -> Path:
    """A run folder's metrics.jsonl, or the file itself when given one."""
    return Path(run_dir) / METRICS if Path(run_dir).is_dir() else Path(run_dir)


def read_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = metrics_path(run_dir)
    if not path.is_file():
        raise UserError(f"{run_dir} holds no {METRICS} (is it a run folder written by the recipes?)")
    return read_metrics(path, warn=lambda text: print(f"warning: {text}", file=sys.stderr))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _median(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None


def is_evaluation(record: dict[str, Any]) -> bool:
    """An evaluation line: held-out figures (val_*), rather than a training line."""
    return any(key.startswith("val_") for key in record)


def summarize(run_dir: Path, name: str | None = None, warmup_steps: int | None = None,
              reports: Sequence[Report] = ()) -> RunSummary:
    """A run's figures from its metrics.jsonl; `reports` (the objectives', train.objective.reports())
    add the columns of the objective the run trained."""
    lines = read_lines(run_dir)
    train_lines = [r for r in lines if "loss" in r and "tokens_per_sec" in r]
    evals = [r for r in lines if is_evaluation(r)]
    losses = [r for r in evals if "val_loss" in r]
    steps = max((r["step"] for r in lines), default=0)
    if warmup_steps is None:
        warmup_steps = max(train_lines[0]["step"] if train_lines else 0, math.ceil(0.1 * steps))
    measured = [r for r in train_lines if r["step"] > warmup_steps]

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in measured if r.get(key) is not None]

    tps = column("tokens_per_sec")
    memory = next((r for r in lines if "model_state_mb" in r), {})
    peaks = [float(r["peak_mem_mb"]) for r in train_lines if r.get("peak_mem_mb") is not None]
    step_times = column("step_time")
    compiled = [float(r["compile_s"]) for r in train_lines if r.get("compile_s")]
    return RunSummary(
        name=name or Path(run_dir).name,
        steps=steps,
        measured_lines=len(measured),
        tokens_per_sec=_median(tps),
        tokens_per_sec_p10=percentile(tps, 10) if tps else None,
        tokens_per_sec_p90=percentile(tps, 90) if tps else None,
        samples_per_sec=_median(column("samples_per_sec")),
        step_time_ms=_median(step_times) * 1e3 if step_times else None,
        tflops_per_rank=_median(column("tflops_per_rank")),
        mfu=_median(column("mfu")),
        peak_mem_mb=max(peaks) if peaks else None,
        model_state_mb=memory.get("model_state_mb"),
        activation_mb=memory.get("activation_mb"),
        final_val_loss=losses[-1]["val_loss"] if losses else None,
        best_val_loss=min(r["val_loss"] for r in losses) if losses else None,
        compile_s=max(compiled) if compiled else None,
        task_scores=_task_scores(evals[-1]) if evals and _task_scores(evals[-1]) else None,
        val_loss_by_source=evals[-1].get("val_loss_by_source") if evals else None,
        objective={c.key: v for r in reports for c in r.columns if (v := c.value(lines, measured)) is not None},
        objective_columns=[c for r in reports for c in r.columns if c.value(lines, measured) is not None],
    )


TASK_PREFIX = "eval/"  # downstream scores in metrics.jsonl: eval/<task>/<metric>


def _task_scores(record: dict[str, Any]) -> dict[str, float]:
    return {k[len(TASK_PREFIX):]: v for k, v in record.items() if k.startswith(TASK_PREFIX)}


def _scores_text(scores: dict[str, float], digits: int = 3) -> str:
    return ", ".join(f"{name} {value:.{digits}f}" for name, value in scores.items())


# Table columns by what they tell: (field, header, format).
WHICH_RUN = [("name", "run", "{}"), ("measured_lines", "log lines", "{}")]
THROUGHPUT = [  # medians over the measured lines
    ("tokens_per_sec", "tokens/s (median)", "{:.0f}"),
    ("tokens_per_sec_p10", "p10", "{:.0f}"),
    ("tokens_per_sec_p90", "p90", "{:.0f}"),
    ("step_time_ms", "step ms", "{:.0f}"),
    ("tflops_per_rank", "TFLOP/s/rank", "{:.3g}"),
    ("mfu", "MFU", "{:.1%}"),
    ("compile_s", "compile s", "{:.0f}"),
]
MEMORY = [("peak_mem_mb", "peak MiB", "{:.0f}"), ("model_state_mb", "model states MiB", "{:.0f}")]
QUALITY = [
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("best_val_loss", "best val loss", "{:.4f}"),
    ("val_loss_by_source", "val loss by source", lambda losses: _scores_text(losses, 4)),
    ("task_scores", "task scores (last eval)", _scores_text),
]
COLUMNS = [*WHICH_RUN, *THROUGHPUT, *MEMORY, *QUALITY]


def columns(summaries: list[RunSummary]) -> list[tuple[str, str, Any]]:
    """The table's columns: the common ones, then each objective column some run has."""
    found = {c.key: c for s in summaries for c in s.objective_columns}
    return COLUMNS + [(c.key, c.header, c.fmt) for c in found.values()]


def _value(summary: RunSummary, key: str) -> Any:
    return {**vars(summary), **summary.objective}.get(key)


RUN_FIELDS = [f.name for f in fields(RunSummary)]

# Fewer measured log lines than this, and a median is one or two windows: say so under the table.
FEW_LINES = 3


def caveats(summaries: list[RunSummary]) -> list[str]:
    """A line for each run whose throughput figures rest on too few log lines to be a median."""
    notes = []
    for s in summaries:
        if s.measured_lines < FEW_LINES:
            what = "no log line" if not s.measured_lines else f"{s.measured_lines} log line(s)"
            notes.append(f"note: {s.name}'s throughput rests on {what} after warm-up (p10 and p90 are then the "
                         "same windows); run longer, or log more often (--log_interval)")
    return notes


def _cells(summary: RunSummary, shown: list[tuple[str, str, Any]]) -> list[str]:
    cells = []
    for key, _, fmt in shown:
        value = _value(summary, key)
        cells.append("-" if value is None else fmt(value) if callable(fmt) else fmt.format(value))
    return cells


def text_table(summaries: list[RunSummary]) -> str:
    shown = columns(summaries)
    rows = [[h for _, h, _ in shown]] + [_cells(s, shown) for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(summaries: list[RunSummary]) -> str:
    shown = columns(summaries)
    header = "| " + " | ".join(h for _, h, _ in shown) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(shown))) + "|"
    body = ["| " + " | ".join(_cells(s, shown)) + " |" for s in summaries]
    return "\n".join([header, rule, *body])


def csv_text(summaries: list[RunSummary]) -> str:
    """Every summary field, unformatted."""
    buffer = io.StringIO()
    names = [name for name in RUN_FIELDS if name not in ("objective", "objective_columns")]
    names += list(dict.fromkeys(key for s in summaries for key in s.objective))
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for s in summaries:
        values = {k: _value(s, k) for k in names}
        writer.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, (dict, tuple)) else v
                         for k, v in values.items()})
    return buffer.getvalue()


def plot(run_dirs: list[Path], names: list[str], out_dir: Path, reports: Sequence[Report] = ()) -> list[Path]:
    """loss_vs_tokens.png (training and validation loss) and tokens_per_sec.png, all runs on each; the
    curves of `reports` where the runs have their figures, downstream evaluations task_scores.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(name, read_lines(d)) for d, name in zip(run_dirs, names)]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, runs, "tokens", ("loss", "train"), ("val_loss", "validation"))
    ax.set(xlabel="tokens seen", ylabel="loss (nats/token)", title="Loss against tokens")
    written.append(_save(plt, fig, ax, out_dir / "loss_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, lines in runs:
        train_lines = [r for r in lines if "tokens_per_sec" in r]
        ax.plot([r["step"] for r in train_lines], [r["tokens_per_sec"] for r in train_lines], "o-", label=name)
    ax.set(xlabel="step", ylabel="tokens/s (all ranks)", title="Throughput against step")
    ax.set_ylim(bottom=0)
    written.append(_save(plt, fig, ax, out_dir / "tokens_per_sec.png"))

    for curve in (c for report in reports for c in report.curves):
        if any(curve.train[0] in r for _, lines in runs for r in lines):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            _curves(ax, runs, curve.x, curve.train, curve.evaluated)
            ax.set(xlabel=curve.x, ylabel=curve.ylabel, title=curve.title)
            written.append(_save(plt, fig, ax, out_dir / curve.file))

    scored = [(name, [r for r in lines if _task_scores(r)]) for name, lines in runs]
    if any(evals for _, evals in scored):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, evals in scored:
            for metric in dict.fromkeys(k for r in evals for k in _task_scores(r)):
                points = [(r["tokens"], r[TASK_PREFIX + metric]) for r in evals if TASK_PREFIX + metric in r]
                ax.plot(*zip(*points), "o-", label=f"{name} {metric}")
        ax.set(xlabel="tokens seen", ylabel="score", title="Downstream tasks (lm-evaluation-harness)")
        written.append(_save(plt, fig, ax, out_dir / "task_scores.png"))
    return written


def _curves(ax, runs, x: str, train: tuple[str, str], evaluated: tuple[str, str]) -> None:
    """Each run's training values as a line and its evaluations as dots on it, against `x`."""
    for name, lines in runs:
        points = [r for r in lines if train[0] in r]
        evals = [r for r in lines if evaluated[0] in r]
        if not points:
            continue
        line, = ax.plot([r[x] for r in points], [r[train[0]] for r in points], label=f"{name} {train[1]}")
        if evals:
            ax.plot([r[x] for r in evals], [r[evaluated[0]] for r in evals], "o--", color=line.get_color(),
                    label=f"{name} {evaluated[1]}")


def _save(plt, fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
