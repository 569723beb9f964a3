#!/usr/bin/env python
"""Fine-tune a Hugging Face causal LM on instruction data with DeepSpeed (loss on responses only).

    deepspeed --num_gpus 2 recipes/finetune.py --deepspeed_config ds_configs/zero3.json \\
        --model_name_or_path exported/quickstart --data data/sft_demo/train.jsonl \\
        --output_dir runs/finetune --max_steps 200 --export_hf exported/finetuned

Rows are {"messages": [{"role", "content"}, ...]} or {"prompt", "response"}, in JSONL, Parquet
or a datasets folder. They are rendered with the tokenizer's chat template (or a documented
default), and only assistant tokens carry labels. --pack puts several examples in one
sequence without attention or loss crossing between them. Flags, outputs, checkpoints and
export are the same as recipes/pretrain.py's.

With --use_peft, LoRA adapters (peft) train and the base stays frozen (and, under ZeRO-3,
partitioned); checkpoints hold the adapters and name the base they need. --export_hf writes
the merged model, --export_adapter the adapter alone:

    deepspeed --num_gpus 2 recipes/finetune.py --deepspeed_config ds_configs/zero3.json \\
        --model_name_or_path exported/quickstart --use_peft --lora_r 16 --output_dir runs/lora \\
        --max_steps 200 --export_hf exported/lora_merged --export_adapter exported/lora_adapter
"""

from gpt_recipes.args import FinetuneArgs, parse_args
from gpt_recipes.data import sft
from gpt_recipes.data.sft_demo import ensure_demo
from gpt_recipes.errors import cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, plan_run


def encode_rows(tokenizer, rows, seq_len: int, truncate: bool, say) -> list[sft.Example]:
    examples = [sft.encode(tokenizer, sft.to_messages(row, where), where) for where, row in rows]
    return sft.apply_length_policy(examples, seq_len, truncate, say)


@cli_entry
def main() -> None:
    args = parse_args(FinetuneArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    start = check_starting_model(args, run, args.model_name_or_path, args.pad_to_multiple_of)
    tokenizer, seq_len = start.tokenizer, start.seq_len

    # 2. ... and the data: rows rendered, tokenised, label-masked, length-checked, maybe packed.
    ensure_demo(args.data)
    train_rows, val_rows = sft.read_split(args.data, args.val_data, args.val_fraction)
    run.say(f"Training data {args.data}:")
    train_examples = encode_rows(tokenizer, train_rows, seq_len, args.truncate, run.say)
    run.say("Validation data:")
    val_examples = encode_rows(tokenizer, val_rows, seq_len, args.truncate, run.say)
    shapes = {"pad_multiple": args.pad_to_multiple_of, "max_width": seq_len}
    train_samples = sft.SFTSamples(sft.pack(train_examples, seq_len) if args.pack else [[e] for e in train_examples],
                                   start.pad_id, packed=args.pack, **shapes)
    if args.pack:
        run.say(f"  packed {len(train_examples)} examples into {len(train_samples)} sequences of <= {seq_len} tokens")
    val_samples = sft.SFTSamples([[e] for e in val_examples], start.pad_id, packed=False, **shapes)
    batches = make_batches(args, run, train_samples, val_samples, args.val_data or args.data)

    # 3. Start the ranks, load the pretrained weights (under ZeRO-3 each rank loads only its
    # partition), add the adapters if asked, train.
    job = Job("finetune", start.config, tokenizer, seq_len, train_samples, val_samples,
              start.builder(run, args.seed), adapter=start.adapter, data_fingerprint=sft.rows_digest(train_rows),
              record={"data": {"train": args.data, "val": args.val_data, "train_examples": len(train_examples),
                               "val_examples": len(val_examples), "packed": args.pack}})
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
