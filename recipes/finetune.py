#!/usr/bin/env python
"""Fine-tune a Hugging Face causal LM on instruction data with DeepSpeed (loss on responses only).

    deepspeed --num_gpus 2 recipes/finetune.py --deepspeed_config ds_configs/zero3.json \\
        --model_name_or_path exported/quickstart --data data/sft_demo/train.jsonl \\
        --output_dir runs/finetune --max_steps 200 --export_hf exported/finetuned

Rows are {"messages": [{"role", "content"}, ...]} or {"prompt", "response"}, in JSONL, Parquet
or a datasets folder. They are rendered with the tokenizer's chat template (or a documented
default), and only assistant tokens carry labels. Several --data files make a weighted mixture
(--data_weights), each file with its own held-out rows and validation loss. --pack puts several examples in one
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
from gpt_recipes.data.mixture import normalise_weights
from gpt_recipes.data.sft_demo import ensure_demo
from gpt_recipes.errors import cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, make_mixture_batches, plan_run
from gpt_recipes.train.lm import NextToken


def encode_rows(tokenizer, rows, seq_len: int, truncate: bool, say) -> list[sft.Example]:
    examples = [sft.encode(tokenizer, sft.to_messages(row, where), where) for where, row in rows]
    return sft.apply_length_policy(examples, seq_len, truncate, say)


@cli_entry
def main() -> None:
    args = parse_args(FinetuneArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    start = check_starting_model(args, run)
    tokenizer, seq_len = start.tokenizer, start.seq_len

    # 2. ... and the data: each file's rows rendered, tokenised, label-masked, length-checked, maybe
    #    packed; several files make a weighted mixture, each with its own held-out rows.
    for path in args.data:
        ensure_demo(path)
    sources = sft.read_sources(args.data, args.val_data, args.val_fraction)
    weights = normalise_weights(args.data_weights, len(sources), "--data files")
    shapes = {"pad_multiple": args.pad_to_multiple_of, "max_width": seq_len}
    train_parts, val_parts = [], []
    for source in sources:
        run.say(f"Training data {source.path}:")
        examples = encode_rows(tokenizer, source.train, seq_len, args.truncate, run.say)
        train_parts.append(sft.SFTSamples(sft.pack(examples, seq_len) if args.pack else [[e] for e in examples],
                                          start.pad_id, packed=args.pack, **shapes))
        if args.pack:
            run.say(f"  packed {len(examples)} examples into {len(train_parts[-1])} sequences of <= {seq_len} tokens")
        run.say("Validation data:")
        val_parts.append(sft.SFTSamples([[e] for e in encode_rows(tokenizer, source.val, seq_len, args.truncate,
                                                                   run.say)], start.pad_id, packed=False, **shapes))
    if len(sources) == 1:
        train_samples, val_samples = train_parts[0], val_parts[0]
        batches = make_batches(args, run, train_samples, val_samples, args.data[0])
    else:
        names = [s.name for s in sources]
        train_samples, val_samples = sft.MixedSFT(train_parts, names), sft.MixedSFT(val_parts, names)
        batches = make_mixture_batches(args, run, train_samples, val_samples, weights,
                                       unit="sequences" if args.pack else "examples")
    fingerprint = "+".join(f"{sft.rows_digest(s.train)}x{w:.6g}" for s, w in zip(sources, weights))

    # 3. Start the ranks, load the pretrained weights (under ZeRO-3 each rank loads only its
    # partition), add the adapters if asked, train.
    objective = NextToken(args.fused_loss, one_length=False, router_aux_loss_coef=args.router_aux_loss_coef)
    job = Job("finetune", objective, start.config, tokenizer, seq_len, start.builder(run, args.seed),
              weights=start.weights,
              data_fingerprint=fingerprint if len(sources) > 1 else sft.rows_digest(sources[0].train),
              data={"sources": [{"name": s.name, "train": s.path, "weight": w, "train_samples": len(t),
                                 "val_samples": len(v)} for s, w, t, v in zip(sources, weights, train_parts, val_parts)],
                    "val": args.val_data, "packed": args.pack})
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
