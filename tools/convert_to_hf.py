#!/usr/bin/env python
"""Export a DeepSpeed checkpoint (any ZeRO stage, any number of ranks) to a Hugging Face folder.

    python tools/convert_to_hf.py runs/quickstart exported/quickstart
    python tools/convert_to_hf.py runs/quickstart/checkpoints exported/step100 --tag step100 --dtype fp32
    python tools/convert_to_hf.py runs/lora exported/lora_merged              # LoRA merged into its base
    python tools/convert_to_hf.py runs/lora exported/lora_adapter --adapter   # the adapter alone (peft)

The folder loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained and pipeline().
The tool reloads what it wrote and compares logits with the checkpoint's weights; a
mismatch is an error and leaves OUT_DIR untouched. A LoRA checkpoint needs its base model,
found where it was trained from (or --base_model) and checked to hold the same weights.
"""

from gpt_recipes.args import ConvertToHFArgs, parse_args
from gpt_recipes.checkpoints.export import export
from gpt_recipes.errors import cli_entry
from gpt_recipes.metrics.memory import PeakAnonymous, peak_memory_mb


@cli_entry
def main() -> None:
    args = parse_args(ConvertToHFArgs, description=__doc__)
    with PeakAnonymous() as anonymous:
        libraries_mb = anonymous.peak_mb
        report = export(args.checkpoint, args.out_dir, tag=args.tag, dtype=args.dtype,
                        max_shard_size=args.max_shard_size, force=args.force, verify=args.verify,
                        adapter=args.adapter, base_model=args.base_model)
    fp32_mb = report.parameters * 4 / 2**20
    print(f"Peak memory: {anonymous.peak_mb:.0f} MiB anonymous, {anonymous.peak_mb - libraries_mb:.0f} MiB above the "
          f"{libraries_mb:.0f} MiB the libraries held before export ({(anonymous.peak_mb - libraries_mb) / fp32_mb:.2f}"
          f"x the model's {fp32_mb:.0f} MiB in fp32); {peak_memory_mb('cpu'):.0f} MiB resident, memory-mapped "
          "checkpoint pages included")


if __name__ == "__main__":
    main()
