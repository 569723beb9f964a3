#!/usr/bin/env python
"""Preference-tune a Hugging Face causal LM with DPO on chosen/rejected pairs, through DeepSpeed.

    deepspeed --num_gpus 2 recipes/dpo.py --deepspeed_config ds_configs/zero3.json \\
        --model_name_or_path exported/finetuned --data data/dpo_demo/train.jsonl \\
        --output_dir runs/dpo --max_steps 100 --beta 0.1 --export_hf exported/dpo

Rows are {"prompt", "chosen", "rejected"} with a text prompt, or chat {"messages", "chosen",
"rejected"} where the answers are the conversation's next assistant turn (text or an
assistant message), in JSONL, Parquet or a datasets folder. They are rendered with the
tokenizer's chat template; only the answer's tokens are scored. The reference model is the
starting model: its log-probabilities are computed once before the first step and stored in
OUTPUT_DIR/reference_logps.pt, which --resume reuses after checking it belongs to the same
data and model; no second model is held. Flags, outputs, checkpoints, LoRA (--use_peft) and
export are those of recipes/finetune.py.
"""

from gpt_recipes.args import parse_args
from gpt_recipes.data import sft
from gpt_recipes.data.sft_demo import ensure_preference_demo
from gpt_recipes.errors import cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, plan_run
from gpt_recipes.train import preference
from gpt_recipes.train.reference import StoredReference


def encode_pairs(tokenizer, rows, seq_len: int, truncate: bool, say) -> list[preference.Pair]:
    pairs = [preference.encode_pair(tokenizer, row, where) for where, row in rows]
    return sft.apply_length_policy(pairs, seq_len, truncate, say, fit=preference.fit_length, noun="pair")


@cli_entry
def main() -> None:
    args = parse_args(preference.DPOArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    start = check_starting_model(args, run)

    # 2. ... and the pairs: rendered, tokenised, answer-masked, length-checked ...
    ensure_preference_demo(args.data)
    train_rows, val_rows = sft.read_split(args.data, args.val_data, args.val_fraction)
    run.say(f"Training pairs {args.data}:")
    train_pairs = encode_pairs(start.tokenizer, train_rows, start.seq_len, args.truncate, run.say)
    run.say("Validation pairs:")
    val_pairs = encode_pairs(start.tokenizer, val_rows, start.seq_len, args.truncate, run.say)
    shapes = {"pad_multiple": args.pad_to_multiple_of, "max_width": start.seq_len}
    train = preference.PreferenceSamples(train_pairs, start.pad_id, **shapes)
    val = preference.PreferenceSamples(val_pairs, start.pad_id, **shapes)
    batches = make_batches(args, run, train, val, args.val_data or args.data)
    # ... and, on resume, the stored reference log-probabilities of the starting model.
    reference = StoredReference(run, train, val, start.name_or_path, adapted=start.adapter is not None)

    # 3. Start the ranks, load the starting model (under ZeRO-3 each rank only its partition),
    # score the reference, train.
    job = Job("dpo", preference.DPO(args, reference), start.config, start.tokenizer, start.seq_len,
              start.builder(run, args.seed), weights=start.weights, data_fingerprint=sft.rows_digest(train_rows),
              data={"train": args.data, "val": args.val_data, "train_pairs": len(train), "val_pairs": len(val)})
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
