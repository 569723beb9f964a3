#!/usr/bin/env python
"""Summarise runs: throughput, TFLOP/s, MFU, memory and validation loss, with plots.

    python tools/summarize_throughput.py runs/quickstart
    python tools/summarize_throughput.py runs/sweep/* --markdown --csv sweep.csv --plots plots/

Per run: median and p10/p90 tokens/s, median step time, TFLOP/s per rank and MFU, peak
memory per rank, the measured model states, final and best validation loss. Log lines in
the warm-up (default: up to 10% of the steps, and at least the first line) are left out.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt_recipes.args import flag, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.metrics.summary import caveats, csv_text, markdown_table, metrics_path, plot, summarize, text_table
from gpt_recipes.train.objective import reports


@dataclass
class SummarizeArgs:
    """Summarise the throughput, memory and loss of runs written by the recipes."""

    runs: list[str] = flag([], "run folders (or their metrics.jsonl files)", positional=True, metavar="RUN_DIR",
                           nargs="+")
    warmup_steps: Optional[int] = flag(None, "leave log lines up to this step out of throughput figures "
                                       "(default: 10%% of the steps, and at least the first line)")
    markdown: bool = flag(False, "print the table as Markdown")
    csv: Optional[str] = flag(None, "also write every figure to this CSV file")
    plots: Optional[str] = flag(None, "write loss_vs_tokens.png and tokens_per_sec.png into this folder (and "
                                "rewards.png for GRPO runs, task_scores.png with downstream evaluations)")


@cli_entry
def main() -> None:
    args = parse_args(SummarizeArgs, description=__doc__)
    run_dirs = [Path(r) for r in args.runs]
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be 0 or positive, got {args.warmup_steps}")
    inputs = {"RUN_DIR": [metrics_path(d) for d in run_dirs]}
    if args.csv:
        check_output_path(args.csv, "--csv", inputs, file=True)
    if args.plots:
        check_output_path(args.plots, "--plots", inputs, outputs={"--csv": args.csv} if args.csv else None)
    names = _names(run_dirs)
    summaries = [summarize(d, name, args.warmup_steps, reports()) for d, name in zip(run_dirs, names)]
    print(markdown_table(summaries) if args.markdown else text_table(summaries))
    for note in caveats(summaries):
        print(note)
    if args.csv:
        Path(args.csv).write_text(csv_text(summaries))
        print(f"Wrote {args.csv}")
    if args.plots:
        for path in plot(run_dirs, names, Path(args.plots), reports()):
            print(f"Wrote {path}")


def _names(run_dirs: list[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name."""
    names = [d.name if d.is_dir() else d.parent.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{n}" for d, n in zip(run_dirs, names)]
    return names


if __name__ == "__main__":
    main()
