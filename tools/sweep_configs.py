#!/usr/bin/env python
"""Run the same short pretraining once per DeepSpeed config, then compare the runs.

    python tools/sweep_configs.py                                   # ds_configs/zero0..3.json
    python tools/sweep_configs.py ds_configs/zero1.json ds_configs/zero3.json --max_steps 50 \\
        -- --model gpt2-micro --seq_len 256

Each config trains into OUTPUT_DIR/<config name>/ (flags after `--` go to
recipes/pretrain.py); the summary table and plots (OUTPUT_DIR/*.png) answer "which ZeRO
stage is fastest, or smallest, for this model here". A config that fails is reported and
the sweep goes on.
"""

import glob
import sys
from dataclasses import dataclass
from pathlib import Path

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
    plots: bool = flag(True, "write the comparison plots into OUTPUT_DIR")
    overwrite: bool = flag(False, "replace run folders left by an earlier sweep")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


@cli_entry
def main() -> None:
    own, recipe_args = split_argv(sys.argv[1:])
    args = parse_args(SweepArgs, own, description=__doc__)
    args.check_counts("log_interval")
    configs = sorted({Path(f) for pattern in args.configs for f in (glob.glob(pattern) or [pattern])})
    if not configs:
        raise UserError("no DeepSpeed configs given")
    for config in configs:
        if not config.is_file():
            raise UserError(f"DeepSpeed config {config} does not exist")
    out = Path(args.output_dir)
    run_args = ["--max_steps", str(args.max_steps), "--log_interval", str(args.log_interval),
                "--eval_interval", "0", *(["--overwrite"] if args.overwrite else []), *recipe_args]

    runs = []
    for n, config in enumerate(configs, 1):
        print(f"[{n}/{len(configs)}] {config}", flush=True)
        runs.append(run_pretrain(config, out / config.stem, args.ranks, run_args, quiet=True))
    done = [r for r in runs if r.returncode == 0]
    for r in runs:
        if r.returncode:
            print(f"{r.config}: failed (exit {r.returncode}); left out of the summary")
    if not done:
        raise UserError("every run of the sweep failed")
    summaries = [summarize(r.out_dir, r.config.stem, reports=reports()) for r in done]
    print()
    print(markdown_table(summaries) if args.markdown else text_table(summaries))
    for note in caveats(summaries):
        print(note)
    if args.plots:
        for path in plot([r.out_dir for r in done], [r.config.stem for r in done], out, reports()):
            print(f"Wrote {path}")


if __name__ == "__main__":
    main()
