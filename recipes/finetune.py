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

from pathlib import Path

from gpt_recipes import sft
from gpt_recipes.adapters import plan_adapter
from gpt_recipes.args import FinetuneArgs, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.export import check_output_folder
from gpt_recipes.models import check_seq_len, check_tokenizer_fits, load_pretrained, load_pretrained_config
from gpt_recipes.runner import Job, check_adapter_resume, execute, make_batches, plan_run
from gpt_recipes.sft_demo import ensure_demo
from gpt_recipes.tokenizer import load_tokenizer


def read_split(args: FinetuneArgs) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train rows, validation rows), each row with a 'file row N' label for error messages."""
    labelled = lambda path: [(f"{path} row {i + 1}", row) for i, row in enumerate(sft.load_rows(path))]  # noqa: E731
    rows = labelled(args.data)
    val_path = args.val_data
    if val_path is None and Path(args.data).name == "train.jsonl" and (Path(args.data).parent / "val.jsonl").is_file():
        val_path = str(Path(args.data).parent / "val.jsonl")
    if val_path:
        return rows, labelled(val_path)
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must lie between 0 and 1, got {args.val_fraction}")
    held = max(1, round(args.val_fraction * len(rows)))
    if held >= len(rows):
        raise UserError(f"{args.data} holds {len(rows)} rows: too few to hold out a validation set")
    return rows[held:], rows[:held]


def encode_rows(tokenizer, rows, seq_len: int, truncate: bool, say) -> list[sft.Example]:
    examples = [sft.encode(tokenizer, sft.to_messages(row, where), where) for where, row in rows]
    kept, report = sft.fit_length(examples, seq_len + 1, truncate)
    say(f"  {report} (limit {seq_len + 1} tokens; policy: {'truncate' if truncate else 'drop'})")
    if not kept:
        raise UserError(f"every example is longer than {seq_len + 1} tokens; raise --seq_len or pass --truncate")
    return kept


@cli_entry
def main() -> None:
    args = parse_args(FinetuneArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    config = load_pretrained_config(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path)
    check_tokenizer_fits(tokenizer, config, args.model_name_or_path)
    if sft.ensure_chat_template(tokenizer):
        run.say("The tokenizer has no chat template: using the default one (saved with checkpoints and exports)")
    seq_len = check_seq_len(config, args.seq_len)
    adapter = plan_adapter(args, config, args.model_name_or_path)
    check_adapter_resume(run, adapter)
    if args.export_adapter:
        if args.export_hf and Path(args.export_adapter).resolve() == Path(args.export_hf).resolve():
            raise UserError("--export_adapter and --export_hf name the same folder; give each its own")
        check_output_folder(Path(args.export_adapter), args.overwrite, force_flag="--overwrite")

    # 2. ... and the data: rows rendered, tokenised, label-masked, length-checked, maybe packed.
    ensure_demo(args.data)
    train_rows, val_rows = read_split(args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run.say(f"Training data {args.data}:")
    train_examples = encode_rows(tokenizer, train_rows, seq_len, args.truncate, run.say)
    run.say("Validation data:")
    val_examples = encode_rows(tokenizer, val_rows, seq_len, args.truncate, run.say)
    if args.pad_to_multiple_of < 1:
        raise UserError(f"--pad_to_multiple_of must be at least 1, got {args.pad_to_multiple_of}")
    shapes = {"pad_multiple": args.pad_to_multiple_of, "max_width": seq_len}
    train_samples = sft.SFTSamples(sft.pack(train_examples, seq_len) if args.pack else [[e] for e in train_examples],
                                   pad_id, packed=args.pack, **shapes)
    if args.pack:
        run.say(f"  packed {len(train_examples)} examples into {len(train_samples)} sequences of <= {seq_len} tokens")
    val_samples = sft.SFTSamples([[e] for e in val_examples], pad_id, packed=False, **shapes)
    batches = make_batches(args, run, train_samples, val_samples, args.val_data or args.data)

    # 3. Start the ranks, load the pretrained weights (under ZeRO-3 each rank loads only its
    # partition), add the adapters if asked, train.
    def build_model():
        model = load_pretrained(args.model_name_or_path, config, run.ds_cfg)
        return adapter.wrap(model, args.seed) if adapter else model

    job = Job("finetune", config, tokenizer, seq_len, train_samples, val_samples, build_model,
              record={"data": {"train": args.data, "val": args.val_data, "train_examples": len(train_examples),
                               "val_examples": len(val_examples), "packed": args.pack}}, adapter=adapter)
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
