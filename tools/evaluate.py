#!/usr/bin/env python
"""Evaluate a model on downstream tasks with EleutherAI's lm-evaluation-harness.

    python tools/evaluate.py exported/finetuned                       # the local task, offline
    python tools/evaluate.py runs/finetune --limit 100                # a checkpoint (exported on the fly)
    python tools/evaluate.py exported/quickstart --tasks hellaswag,arc_easy --output_file scores.json  # online

A recipe checkpoint (any ZeRO stage, any number of ranks) goes through the verified export
into a temporary folder first. Standard tasks download their data sets from the hub; the
local task, docstring_choice, is built from the default corpus: pick a standard-library
function's first docstring sentence among four, over modules the fine-tuning demo holds out
(chance: 0.25). Prints a table; --output_file writes the harness's results JSON.
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM

from gpt_recipes.args import flag, parse_args
from gpt_recipes.checkpoints.export import export
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.metrics import evaluation


@dataclass
class EvaluateArgs:
    """Evaluate a model on downstream tasks with lm-evaluation-harness."""

    model: str = flag("", "a Hugging Face model folder, or a recipe run / checkpoint folder (exported on the fly)",
                      positional=True, metavar="MODEL_OR_CHECKPOINT")
    tasks: list[str] = flag(["docstring_choice"], "harness task names (default: the local task, built offline)")
    limit: Optional[int] = flag(None, "evaluate only the first N examples of each task")
    output_file: Optional[str] = flag(None, "write the harness's results as JSON to this file", aliases=["output"])
    batch_size: int = flag(8, "examples per forward pass")
    tag: Optional[str] = flag(None, "for a checkpoint: its tag such as step200 (default: the 'latest' one)")


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def evaluate_folder(folder: Path, args: EvaluateArgs, tasks: list) -> dict:
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    lm = evaluation.language_model(model, tokenizer, args.batch_size)
    return evaluation.evaluate(lm, tasks, args.limit, chat=bool(tokenizer.chat_template))


@cli_entry
def main() -> None:
    args = parse_args(EvaluateArgs, description=__doc__)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    tasks = evaluation.resolve_tasks([t for name in args.tasks for t in name.split(",") if t])
    path = Path(args.model)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if args.output_file:
        check_output_path(args.output_file, "--output_file", {"MODEL_OR_CHECKPOINT": path}, file=True)
    torch.manual_seed(0)
    if is_model_folder(path):
        results = evaluate_folder(path, args, tasks)
    else:
        with tempfile.TemporaryDirectory(prefix="evaluate_") as tmp:
            folder = Path(tmp) / "model"
            export(path, folder, tag=args.tag)  # verified by reloading, as any export
            results = evaluate_folder(folder, args, tasks)
    print(evaluation.table(results))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2, default=str))
        print(f"Results written to {args.output_file}")


if __name__ == "__main__":
    main()
