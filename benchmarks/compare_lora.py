#!/usr/bin/env python
"""Fine-tune in full and with LoRA at ZeRO-2 and ZeRO-3, on the same data and steps, and compare.

    python benchmarks/compare_lora.py                                  # the demo task, 150 steps, 2 ranks
    python benchmarks/compare_lora.py --stages 3 --max_steps 50 --markdown

Each setting trains into OUTPUT_DIR/<full|lora>_zero<stage>/ with ds_configs/zero<stage>.json
(the JSON owns optimizer, learning rate and precision, so both methods get the same ones).
Per run: the held-out response loss at step 0 and at the end, the median tokens/s, the
trainable parameters, the model states per rank (measured by the recipe, and predicted by
gpt_recipes.metrics.memory_plan), the peak resident memory per rank and the final checkpoint's size.
"""

from dataclasses import dataclass
from pathlib import Path

from gpt_recipes import ds_config
from gpt_recipes.args import AdapterArgs, flag, parse_args
from gpt_recipes.checkpoints import paths
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.launch import REPO, ComparisonArgs, run_recipe
from gpt_recipes.metrics.memory_plan import MemoryConfig, estimate, model_sizes
from gpt_recipes.metrics.summary import read_lines, summarize
from gpt_recipes.models.adapters import lora_config
from gpt_recipes.models.causal_lm import load_pretrained_config

MiB = 2**20


@dataclass
class CompareLoraArgs(ComparisonArgs):
    """Fine-tune in full and with LoRA at each ZeRO stage, on the same data and steps, and compare."""

    model_name_or_path: str = flag("exported/quickstart", "Hugging Face model folder to fine-tune")
    data: str = flag("data/sft_demo/train.jsonl", "fine-tuning rows (the default demo task is built on first use)")
    stages: list[int] = flag([2, 3], "ZeRO stages to compare (ds_configs/zero<stage>.json each)")
    max_steps: int = flag(150, "steps per run")
    lora_r: int = flag(16, "LoRA rank (alpha and dropout at recipes/finetune.py's defaults)")
    output_dir: str = flag("runs/compare_lora", "one run folder per setting is written under this folder")
    overwrite: bool = flag(False, "replace run folders left by an earlier comparison")


def checkpoint_bytes(run_dir: Path) -> int:
    ckpt_dir = paths.checkpoints_dir(run_dir)
    return sum(p.stat().st_size for p in (ckpt_dir / paths.latest_tag(ckpt_dir)).rglob("*") if p.is_file())


@cli_entry
def main() -> None:
    args = parse_args(CompareLoraArgs, description=__doc__)
    args.check_counts("lora_r")
    configs = {stage: REPO / "ds_configs" / f"zero{stage}.json" for stage in args.stages}
    for stage, path in configs.items():
        if not path.is_file():
            raise UserError(f"--stages {stage}: there is no {path.relative_to(REPO)}")
    model_config = load_pretrained_config(args.model_name_or_path)
    lora = lora_config(AdapterArgs(use_peft=True, lora_r=args.lora_r), model_config, args.model_name_or_path)
    out = Path(args.output_dir)
    common = ["--model_name_or_path", args.model_name_or_path, "--data", args.data, "--max_steps", str(args.max_steps),
              "--log_interval", "10", "--eval_interval", "0", *(["--overwrite"] if args.overwrite else [])]

    rows = []
    for stage, config in configs.items():
        for method in ("full", "lora"):
            name = f"{method}_zero{stage}"
            print(f"[{name}] {config.relative_to(REPO)}", flush=True)
            extra = ["--use_peft", "--lora_r", str(args.lora_r)] if method == "lora" else []
            result = run_recipe("finetune", config, out / name, args.ranks, [*common, *extra], quiet=True)
            if result.returncode:
                raise UserError(f"the {name} run failed (exit {result.returncode}); see its output above")
            evals = [r for r in read_lines(result.out_dir) if "val_loss" in r]
            summary = summarize(result.out_dir)
            sizes = model_sizes(model_config, lora if method == "lora" else None)
            planned = estimate(MemoryConfig.from_config(name, ds_config.load_config(config), args.ranks), sizes,
                               args.ranks, 0.0)
            rows.append([name, f"{evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}",
                         f"{summary.tokens_per_sec:.0f}", f"{sizes.trainable / 1e6:.3f}M",
                         f"{summary.model_state_mb:.0f}", f"{planned.model_states / MiB:.0f}",
                         f"{summary.peak_mem_mb:.0f}", f"{checkpoint_bytes(result.out_dir) / MiB:.1f}"])

    header = ["run", "held-out loss", "tokens/s", "trainable", "model states MiB", "planned MiB", "peak RSS MiB",
              "checkpoint MiB"]
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" + "---:|" * (len(header) - 1))
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
