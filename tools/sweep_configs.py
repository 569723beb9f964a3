#!/usr/bin/env python
"""Run the same short pretraining once per DeepSpeed config, then compare the runs.

    python tools/sweep_configs.py                                   # ds_configs/zero0..3.json
    python tools/sweep_configs.py ds_configs/zero1.json ds_configs/zero3.json --max_steps 50 \\
        -- --model gpt2-micro --seq_len 256

Each config trains into OUTPUT_DIR/<config name>/ (flags after `--` go to
recipes/pretrain.py); the summary table and plots (OUTPUT_DIR/*.png) answer "which ZeRO
stage is fastest, or smallest, for this model here". A config that fails is reported and
the sweep goes on.

With --models A B each config runs once per model (OUTPUT_DIR/<config>_<model>/): a dense model
against a mixture of experts with its active parameters, say; a pair the recipe refuses (expert
parallelism for a dense model) is reported like a failed run.

With --repeats N the configs run in turn, N rounds over all of them (OUTPUT_DIR/<name>_r<k>/),
so that a drift in the machine's speed (another job starting) hits every config alike; each
config's tokens/s is then the median over rounds with its range, and the sweep says when that
spread is larger than the differences between configs. One round cannot tell noise from a
difference, and says so.
"""

import glob
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_recipes.args import flag, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.launch import ComparisonArgs, run_pretrain
from gpt_recipes.metrics.summary import caveats, markdown_table, plot, summarize, text_table
from gpt_recipes.train.objective import reports


@dataclass
class SweepArgs(ComparisonArgs):
    """Run the same short pretraining once per DeepSpeed config, then summarise the runs.

    Flags after `--` go to recipes/pretrain.py (model, data, seq_len, ...).
    """

    configs: list[str] = flag(["ds_configs/zero[0-3].json"], "DeepSpeed JSON files or globs, one run each",
                              positional=True, metavar="CONFIG", nargs="*")
    output_dir: str = flag("runs/sweep", "one run folder per config is written under this folder")
    log_interval: int = flag(5, "steps between metrics lines")
    models: list[str] = flag([], "run each config once per model (presets or config JSONs) instead of once with the "
                                 "--model after `--`")
    repeats: int = flag(1, "rounds over all configs, run in turn; tokens/s is the median over rounds, with its range")
    plots: bool = flag(True, "write the comparison plots into OUTPUT_DIR")
    overwrite: bool = flag(False, "replace run folders left by an earlier sweep")


def run_order(configs: list, repeats: int) -> list[tuple[int, Any]]:
    """(round, config) in the order they run: every config once per round, rounds one after another."""
    return [(k, config) for k in range(1, repeats + 1) for config in configs]


def entries(configs: list[Path], models: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(name, config, the recipe's model flags) of each run of a round."""
    if not models:
        return [(config.stem, config, []) for config in configs]
    return [(f"{config.stem}_{Path(model).stem}", config, ["--model", model]) for config in configs for model in models]


def spread_lines(tokens_per_sec: dict[str, list[float]]) -> list[str]:
    """Each config's median tokens/s over rounds and its range; then whether the largest spread within a
    config is larger than the smallest difference between two configs (the ranking is then noise)."""
    medians = {name: statistics.median(v) for name, v in tokens_per_sec.items() if v}
    spreads = {name: (max(v) - min(v)) / medians[name] for name, v in tokens_per_sec.items() if v and medians[name]}
    rounds = max((len(v) for v in tokens_per_sec.values()), default=0)
    lines = [f"tokens/s over {rounds} interleaved round(s): median [min - max]"]
    lines += [f"  {name}: {medians[name]:,.0f} [{min(v):,.0f} - {max(v):,.0f}], spread {spreads[name]:.1%}"
              for name, v in tokens_per_sec.items() if name in spreads]
    ordered = sorted(medians.values())
    gaps = [(b - a) / a for a, b in zip(ordered, ordered[1:]) if a]
    if rounds < 2:
        lines.append("note: one round per config measures no spread, so differences of a few percent may be the "
                     "machine's noise; --repeats 3 runs the configs in turn and shows it")
    elif gaps and spreads and max(spreads.values()) > min(gaps):
        lines.append(f"note: the spread within a config (up to {max(spreads.values()):.1%}) is larger than the "
                     f"smallest difference between configs ({min(gaps):.1%}): this order may be the machine's noise; "
                     "run more --repeats, on a quieter machine")
    return lines


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


@cli_entry
def main() -> None:
    own, recipe_args = split_argv(sys.argv[1:])
    args = parse_args(SweepArgs, own, description=__doc__)
    args.check_counts("log_interval", "repeats")
    configs = sorted({Path(f) for pattern in args.configs for f in (glob.glob(pattern) or [pattern])})
    if not configs:
        raise UserError("no DeepSpeed configs given")
    for config in configs:
        if not config.is_file():
            raise UserError(f"DeepSpeed config {config} does not exist")
    out = Path(args.output_dir)
    run_args = ["--max_steps", str(args.max_steps), "--log_interval", str(args.log_interval),
                "--eval_interval", "0", *(["--overwrite"] if args.overwrite else []), *recipe_args]

    runs, order, names = [], run_order(entries(configs, args.models), args.repeats), {}
    for n, (k, (entry, config, model_args)) in enumerate(order, 1):
        print(f"[{n}/{len(order)}] {config}{''.join(f' {a}' for a in model_args)}"
              + (f" (round {k})" if args.repeats > 1 else ""), flush=True)
        name = entry if args.repeats == 1 else f"{entry}_r{k}"
        runs.append(run_pretrain(config, out / name, args.ranks, [*run_args, *model_args], quiet=True))
        names[runs[-1].out_dir] = entry
    done = [r for r in runs if r.returncode == 0]
    for r in runs:
        if r.returncode:
            print(f"{r.out_dir.name} ({r.config}): failed (exit {r.returncode}); left out of the summary")
    if not done:
        raise UserError("every run of the sweep failed")
    summaries = [summarize(r.out_dir, r.out_dir.name, reports=reports()) for r in done]
    print()
    print(markdown_table(summaries) if args.markdown else text_table(summaries))
    for note in caveats(summaries):
        print(note)
    by_config: dict[str, list[float]] = {}
    for r, summary in zip(done, summaries):
        by_config.setdefault(names[r.out_dir], []).extend([summary.tokens_per_sec] if summary.tokens_per_sec else [])
    print("\n".join(spread_lines(by_config)))
    if args.plots:
        for path in plot([r.out_dir for r in done], [r.out_dir.name for r in done], out, reports()):
            print(f"Wrote {path}")


if __name__ == "__main__":
    main()
