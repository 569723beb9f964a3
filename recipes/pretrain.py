#!/usr/bin/env python
"""Pretrain a GPT-style causal LM with DeepSpeed data parallelism.

    # 2 ranks on one machine (CPU here, GPUs where present); ZeRO stage, precision,
    # batch sizes, optimizer and schedule come from the JSON:
    deepspeed --num_gpus 2 recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --data data/stdlib --model gpt2-nano --output_dir runs/pretrain --max_steps 200

    # continue it later, from OUTPUT_DIR/checkpoints/latest (the same command, with --resume; it
    # stops with one line if the model, tokenizer, data, global batch or seq_len differ):
    deepspeed --num_gpus 2 recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --data data/stdlib --model gpt2-nano --output_dir runs/pretrain --max_steps 400 --resume

Writes OUTPUT_DIR/config.json (the resolved run), metrics.jsonl (one line per log and
evaluation) and checkpoints/step<N>/ with a `latest` tag; with --export_hf DIR, also a
Hugging Face model folder of the final weights, checked against the trained engine.
"""

from gpt_recipes.args import PretrainArgs, parse_args
from gpt_recipes.data.mixture import MixedWindows, check_sources
from gpt_recipes.data.prepare import ensure_default_data
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.data.tokens import PackedTokens, read_meta
from gpt_recipes.errors import cli_entry
from gpt_recipes.models.causal_lm import build_config, build_model, check_seq_len, describe_presets
from gpt_recipes.runner import Job, execute, make_batches, make_mixture_batches, plan_run
from gpt_recipes.train.lm import NextToken


@cli_entry
def main() -> None:
    args = parse_args(PretrainArgs, description=__doc__)
    if args.list_models:
        print(describe_presets())
        return

    # 1. Check every input before any rank starts: flags, DeepSpeed JSON, output folders...
    run = plan_run(args)
    # ... the data (one folder, or a weighted mixture made with one tokenizer) ...
    for folder in args.data:
        ensure_default_data(folder)
    metas = [read_meta(folder) for folder in args.data]
    sources, weights = check_sources(metas, args.data_weights)
    meta = metas[0]
    tokenizer = load_tokenizer(meta.tokenizer_dir)
    # ... and the model, sized for the tokenizer.
    model_config = build_config(args.model, len(tokenizer), tokenizer.eos_token_id)
    seq_len = check_seq_len(model_config, args.seq_len)

    # 2. Windows of packed tokens, in a global order every rank agrees on.
    train, val = (PackedTokens(meta.split_files(split), meta.dtype, seq_len) for split in ("train", "val"))
    if len(sources) == 1:
        batches = make_batches(args, run, train, val, f"{args.data[0]} at seq_len {seq_len}")
        record = meta.raw
        fingerprint = meta.raw.get("fingerprint")
    else:
        train, val = (MixedWindows([PackedTokens(s.meta.split_files(split), s.meta.dtype, seq_len) for s in sources],
                                   [s.name for s in sources]) for split in ("train", "val"))
        batches = make_mixture_batches(args, run, train, val, weights, unit=f"windows at seq_len {seq_len}")
        record = {"mixture": [{"name": s.name, "folder": str(s.meta.root.resolve()), "weight": w, **s.meta.raw}
                              for s, w in zip(sources, weights)]}
        fingerprint = "+".join(f"{s.meta.raw.get('fingerprint')}x{w:.6g}" for s, w in zip(sources, weights))

    # 3. Start the ranks, build a randomly initialised model (same seed on every rank; partitioned
    #    across ranks from the start under ZeRO-3), train on next-token prediction.
    job = Job("pretrain", NextToken(args.fused_loss, router_aux_loss_coef=args.router_aux_loss_coef), model_config, tokenizer, seq_len,
              lambda: build_model(model_config, run.ds_cfg), data=record, data_fingerprint=fingerprint)
    execute(args, run, job, batches)


if __name__ == "__main__":
    main()
