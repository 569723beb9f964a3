#!/usr/bin/env python
"""Train a Hugging Face causal LM with KTO on unpaired desirable and undesirable completions, through DeepSpeed.

    deepspeed --num_gpus 2 recipes/kto.py --deepspeed_config ds_configs/zero3_dpo.json \\
        --model_name_or_path exported/finetuned --data data/kto_demo/train.jsonl \\
        --output_dir runs/kto --max_steps 100 --beta 0.1 --export_hf exported/kto

Rows are {"prompt", "completion", "label"}: the prompt as text or chat messages, the completion
as text or an assistant message, the label true for a desirable completion and false for an
undesirable one (TRL's unpaired preference format), in JSONL, Parquet or a datasets folder. No
row needs a partner; both kinds must be present. They are rendered with the tokenizer's chat
template; only the completion's tokens are scored. KTO's own flags take TRL's names (--beta,
--desirable_weight, --undesirable_weight). The reference model is the starting model: its
log-probabilities of each completion, and of the mismatched completion KTO's KL estimate
scores, are computed once before the first step and stored in OUTPUT_DIR/reference_logps.pt,
as for recipes/dpo.py. Flags, outputs, checkpoints, LoRA (--use_peft) and export are those of
recipes/finetune.py.
"""

from gpt_recipes.args import parse_args
from gpt_recipes.data import sft
from gpt_recipes.data.kto_demo import ensure_kto_demo
from gpt_recipes.errors import cli_entry
from gpt_recipes.pretrained import check_starting_model
from gpt_recipes.runner import Job, execute, make_batches, plan_run
from gpt_recipes.train import kto
from gpt_recipes.train.reference import StoredReference


@cli_entry
def main() -> None:
    args = parse_args(kto.KTOArgs, description=__doc__)

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders, model...
    run = plan_run(args)
    start = check_starting_model(args, run)

    # 2. ... and the rows: read, labels checked, rendered, tokenised, completion-masked, length-checked;
    #    each with its mismatched completion for the KL estimate ...
    ensure_kto_demo(args.data)
    train_rows, val_rows = sft.read_split(args.data, args.val_data, args.val_fraction)
    shapes = {"pad_multiple": args.pad_to_multiple_of, "max_width": start.seq_len}
    samples = []
    for what, rows in ((args.data, train_rows), (args.val_data or f"rows held out of {args.data}", val_rows)):
        run.say(f"{'Training' if not samples else 'Validation'} rows ({what}):")
        encoded = kto.encode_rows(start.tokenizer, rows, start.seq_len, args.truncate, run.say)
        desirable, undesirable = kto.check_classes(encoded, what)
        run.say(f"  {desirable} desirable, {undesirable} undesirable")
        samples.append(kto.KTOSamples(encoded, kto.mismatched(start.tokenizer, encoded, start.seq_len, what),
                                      start.pad_id, **shapes))
        if len(samples) == 1 and (note := kto.weights_note(args, desirable, undesirable)):
            run.notes.append(note)
    train, val = samples
    batches = make_batches(args, run, train, val, args.val_data or args.data)
    # ... and, on resume, the stored reference log-probabilities of the starting model.
    reference = StoredReference(run, train, val, start.name_or_path, adapted=start.adapter is not None, noun="rows")

    # 3. Start the ranks, load the starting model (under ZeRO-3 each rank only its partition),
    #    score the reference, train.
    job = Job("kto", kto.KTO(args, reference), start.config, start.tokenizer, start.seq_len,
              start.builder(run, args.seed), weights=start.weights, data_fingerprint=sft.rows_digest(train_rows),
              data={"train": args.data, "val": args.val_data, "train_rows": len(train), "val_rows": len(val)})
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
