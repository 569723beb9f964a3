#!/usr/bin/env python
"""Export a DeepSpeed checkpoint (any ZeRO stage, any number of ranks) to a Hugging Face folder.

    python tools/convert_to_hf.py runs/quickstart exported/quickstart
    python tools/convert_to_hf.py runs/quickstart/checkpoints exported/step100 --tag step100 --dtype fp32
    python tools/convert_to_hf.py runs/lora exported/lora_merged              # LoRA merged into its base
    python tools/convert_to_hf.py runs/lora exported/lora_adapter --adapter   # the adapter alone (peft)
    python tools/convert_to_hf.py runs/quickstart exported/quickstart --card_only  # refresh README.md only

The folder loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained and pipeline(); its
README.md is a model card (huggingface_hub's format) built from what the run recorded.
The tool reloads what it wrote and compares logits with the checkpoint's weights; a
mismatch is an error and leaves OUT_DIR untouched. A LoRA checkpoint needs its base model,
found where it was trained from (or --base_model) and checked to hold the same weights.
"""

from dataclasses import dataclass
from typing import Optional

from gpt_recipes.args import flag, parse_args
from gpt_recipes.checkpoints.export import export, refresh_card
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.errors import cli_entry, stop_on_signals
from gpt_recipes.metrics.memory import PeakAnonymous, peak_memory_mb


@dataclass
class ConvertToHFArgs:
    """Export a checkpoint written by the recipes to a Hugging Face model folder."""

    checkpoint: str = flag("", "run folder, its checkpoints/ folder, or one step folder", positional=True,
                           metavar="CHECKPOINT_DIR")
    out_dir: str = flag("", "folder to write (config, generation config, safetensors, tokenizer)", positional=True,
                        metavar="OUT_DIR")
    tag: Optional[str] = flag(None, "checkpoint tag such as step200 (default: the 'latest' one)")
    dtype: Optional[str] = flag(None, "fp32, bf16 or fp16 (default: the training precision)",
                                choices=["fp32", "bf16", "fp16"])
    max_shard_size: str = flag("2GB", "largest safetensors file before the weights are sharded")
    overwrite: bool = flag(False, "replace a non-empty OUT_DIR that is an earlier export (only once the new folder is "
                                  "complete)", aliases=["force"])
    verify: bool = flag(True, "reload the folder and compare its logits with the checkpoint's")
    adapter: bool = flag(False, "for a LoRA checkpoint: export the adapter alone (peft's format) instead of the "
                         "merged model")
    base_model: Optional[str] = flag(None, "for a LoRA checkpoint: the base model folder, if it moved since "
                                     "training (its weights must be the same)")
    card_only: bool = flag(False, "write OUT_DIR's model card (README.md) again from its checkpoint's run as it is now, "
                                  "leaving the weights as they are")


@cli_entry
def main() -> None:
    args = parse_args(ConvertToHFArgs, description=__doc__)
    if args.card_only:
        refresh_card(args.out_dir)
        return
    check_output_path(args.out_dir, "OUT_DIR", {"CHECKPOINT_DIR": args.checkpoint,
                                                **({"--base_model": args.base_model} if args.base_model else {})})
    stopped = f"the export was not written, and {args.out_dir} is as it was"
    with PeakAnonymous() as anonymous, stop_on_signals(stopped):
        libraries_mb = anonymous.peak_mb
        report = export(args.checkpoint, args.out_dir, tag=args.tag, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, force=args.overwrite, verify=args.verify,
                        adapter=args.adapter, base_model=args.base_model)
    fp32_mb = report.parameters * 4 / 2**20
    print(f"Peak memory: {anonymous.peak_mb:.0f} MiB anonymous, {anonymous.peak_mb - libraries_mb:.0f} MiB above the "
          f"{libraries_mb:.0f} MiB the libraries held before export ({(anonymous.peak_mb - libraries_mb) / fp32_mb:.2f}"
          f"x the model's {fp32_mb:.0f} MiB in fp32); {peak_memory_mb('cpu'):.0f} MiB resident, memory-mapped "
          "checkpoint pages included")


if __name__ == "__main__":
    main()
