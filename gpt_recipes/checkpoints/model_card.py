"""The model card (README.md) of an export, built with huggingface_hub's ModelCard from what the run recorded.

The card's metadata is what the hub reads: `base_model` (with `base_model_relation`) for a
model trained from another, the training data's names, `library_name`, `pipeline_tag`, tags
(the recipe, the method, the ZeRO stage and layout) and the measured results as `model-index`
entries; its text has the training settings as the run recorded them (the resolved DeepSpeed
JSON and the flags), the results, the framework versions and a quick start that runs as
written. Everything comes from the run folder (config.json, metrics.jsonl) and the checkpoint's
record; nothing is asked of the network.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gpt_recipes.checkpoints.paths import METRICS, recorded_info

CARD = "README.md"
# The objective a run records, as a method tag and in words.
METHODS = {"next_token": "full", "dpo": "dpo", "kto": "kto", "grpo": "grpo"}


def run_record(tag_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the run's config.json, its metrics lines) for a checkpoint of a run folder; empty where absent."""
    run_dir = tag_dir.parent.parent
    record = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    metrics = run_dir / METRICS
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return record, lines


def results(lines: list[dict[str, Any]], step: int | None) -> dict[str, float]:
    """The held-out figures the run measured up to `step`: final and best val_loss (and perplexity),
    held-out reward or accuracy for preference and RL runs, and the last downstream scores."""
    evaluated = [line for line in lines if ("val_loss" in line or "val_reward" in line)
                 and (step is None or line.get("step", 0) <= step)]
    found: dict[str, float] = {}
    if not evaluated:
        return found
    last = evaluated[-1]
    for key, value in last.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                key.startswith(("val_", "eval/"))):
            found[key.removeprefix("eval/")] = float(value)
    losses = [line["val_loss"] for line in evaluated if isinstance(line.get("val_loss"), (int, float))]
    if losses:
        found["best_val_loss"] = min(losses)
    return found


def build(folder: Path, tag_dir: Path, adapter: bool = False) -> Any:
    """The card for the export in `folder` of checkpoint `tag_dir` (`adapter`: a LoRA adapter folder)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    record, lines = run_record(tag_dir)
    info = recorded_info(tag_dir)
    args = record.get("args", {})
    recipe, objective = info.get("recipe") or record.get("recipe", "unknown"), info.get("objective", "next_token")
    lora = info.get("adapter")
    base = lora["base_model"] if lora else args.get("model_name_or_path")
    method = "lora" if lora else METHODS.get(objective, objective)
    tags = ["gpt-recipes", "deepspeed", recipe, method, f"zero-{info.get('zero_stage', 0)}"]
    tags += [name for key, name in (("sequence_parallel", "sequence-parallel"), ("tensor_parallel", "tensor-parallel"),
                                    ("pipeline_stages", "pipeline-parallel"), ("expert_parallel", "expert-parallel"))
             if info.get(key, 1) > 1]
    if lora and objective != "next_token":
        tags.append(METHODS.get(objective, objective))
    measured = results(lines, info.get("step"))
    model_name = folder.name
    data = ModelCardData(
        base_model=base if base and recipe != "pretrain" else None,
        base_model_relation=("adapter" if adapter else "finetune") if base and recipe != "pretrain" else None,
        datasets=[str(d) for d in args.get("data", [])] or None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name,
        eval_results=[EvalResult(task_type="text-generation", dataset_type="held-out",
                                 dataset_name=", ".join(str(d) for d in args.get("data", [])) or "held-out split",
                                 metric_type=key, metric_value=round(value, 6))
                      for key, value in measured.items()] or None,
    )
    text = _text(folder, record, info, measured, recipe, method, base, adapter)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def write(into: Path, folder: Path, tag_dir: Path, adapter: bool = False) -> None:
    """The card of the export that will be `folder`, written into `into` (where it is being written)."""
    build(Path(folder).resolve(), tag_dir, adapter).save(into / CARD)


def _text(folder: Path, record: dict, info: dict, measured: dict[str, float], recipe: str, method: str,
          base: str | None, adapter: bool) -> str:
    args, ds = record.get("args", {}), record.get("deepspeed", {})
    optimizer = ds.get("optimizer", {})
    precision = info.get("precision", "?")
    settings = {
        "recipe": f"recipes/{recipe}.py ({method})",
        "steps": info.get("step"), "tokens seen": info.get("tokens"),
        "global batch": info.get("global_batch"), "sequence length": info.get("seq_len"),
        "optimizer": f"{optimizer.get('type', '?')} {json.dumps(optimizer.get('params', {}))}",
        "scheduler": json.dumps(ds.get("scheduler")) if ds.get("scheduler") else "none",
        "gradient clipping": ds.get("gradient_clipping", "none"), "precision": precision,
        "ZeRO stage": info.get("zero_stage"), "ranks": info.get("world_size"), "seed": info.get("seed"),
        "DeepSpeed config": args.get("deepspeed_config"),
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items() if v is not None)
    found = "\n".join(f"| {k} | {v:.4f} |" for k, v in measured.items()) or "| (no evaluation recorded) | |"
    versions = record.get("versions", {})
    framework = "\n".join(f"- {name} {version}" for name, version in versions.items()) or "- (not recorded)"
    origin = f"trained from `{base}`" if base and recipe != "pretrain" else "pretrained from scratch"
    load = (f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({str(folder)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            "inputs = tokenizer(\"def main(\", return_tensors=\"pt\")\n"
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))") if adapter else (
            f"from transformers import pipeline\n\n"
            f"generate = pipeline(\"text-generation\", model={str(folder)!r})\n"
            "print(generate(\"def main(\", max_new_tokens=20)[0][\"generated_text\"])")
    return f"""
# {folder.name}

A causal language model {origin} with DeepSpeed by this repository's `{recipe}` recipe
({method}{', a LoRA adapter' if adapter else ''}). After uploading, replace the folder path below with
the repository id.

## Quick start

```python
{load}
```

## Training

| setting | value |
|---|---|
{rows}

Training data: {', '.join(f'`{d}`' for d in args.get('data', [])) or 'not recorded'}.

## Results (held out)

| metric | value |
|---|---|
{found}

## Framework versions

{framework}
"""
