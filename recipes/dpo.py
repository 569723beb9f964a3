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

import sys
from dataclasses import asdict

from tqdm.auto import tqdm

from gpt_recipes.args import DPOArgs, parse_args
from gpt_recipes.checkpoints.paths import REFERENCE_LOGPS
from gpt_recipes.data import sft
from gpt_recipes.data.sft_demo import ensure_preference_demo
from gpt_recipes.ds_config import precision
from gpt_recipes.errors import cli_entry
from gpt_recipes.models.adapters import weights_fingerprint
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, plan_run
from gpt_recipes.train import preference


def encode_pairs(tokenizer, rows, seq_len: int, truncate: bool, say) -> list[preference.Pair]:
    pairs = [preference.encode_pair(tokenizer, row, where) for where, row in rows]
    return sft.apply_length_policy(pairs, seq_len, truncate, say, fit=preference.fit_length, noun="pair")


@cli_entry
def main() -> None:
    args = parse_args(DPOArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    objective = preference.PreferenceObjective(args.beta, args.loss_type, args.label_smoothing, args.rpo_alpha)
    objective.check()
    start = check_starting_model(args, run, args.model_name_or_path, args.pad_to_multiple_of)

    # 2. ... and the pairs: rendered, tokenised, answer-masked, length-checked.
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

    # 3. The reference: stored log-probabilities of the starting model, checked on resume.
    fingerprint = preference.reference_fingerprint(weights_fingerprint(start.name_or_path), precision(run.ds_cfg),
                                                   train, val)
    stored = preference.load_reference(run.out_dir, fingerprint) if run.output.resume_tag else None

    def reference_pass(engine, step: int) -> None:
        if stored is not None:
            run.say(f"Reference log-probabilities: reusing {run.out_dir / REFERENCE_LOGPS} (same data, "
                    "model and precision)")
            train.reference, val.reference = stored["train"], stored["val"]
            return
        run.say(f"Reference log-probabilities: one pass of the starting model over {len(train)} + {len(val)} pairs "
                f"before the first step, stored in {run.out_dir / REFERENCE_LOGPS} (no second model is "
                "held" + ("; the adapters start at zero, so this is the base model" if start.adapter else "") + ")")
        scored = []
        for what, samples in (("train", train), ("val", val)):
            with tqdm(total=len(samples), desc=f"reference ({what})", unit="pair", dynamic_ncols=True,
                      disable=not run.env.is_main or not sys.stderr.isatty()) as bar:
                scored.append(preference.reference_logps(engine, samples, run.batch.micro_batch, run.env.rank,
                                                         run.env.world_size, progress=bar.update))
        if run.env.is_main:
            preference.save_reference(run.out_dir, fingerprint, *scored)
        train.reference, val.reference = scored

    # 4. Start the ranks, load the starting model (under ZeRO-3 each rank only its partition),
    # score the reference, train.
    job = Job("dpo", start.config, start.tokenizer, start.seq_len, train, val, start.builder(run, args.seed),
              adapter=start.adapter, make_loss=lambda model, stage: announce(run, objective),
              before_training=reference_pass, data_fingerprint=sft.rows_digest(train_rows),
              record={"data": {"train": args.data, "val": args.val_data, "train_pairs": len(train),
                               "val_pairs": len(val)}, "preference": asdict(objective)})
    execute(args, run, job, batches)


def announce(run, objective: preference.PreferenceObjective) -> preference.DPOLoss:
    run.say(objective.describe())
    return preference.DPOLoss(objective, warn=run.say)


if __name__ == "__main__":
    main()
