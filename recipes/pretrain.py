#!/usr/bin/env python
"""Pretrain a GPT-style causal LM with DeepSpeed data parallelism.

    # 2 ranks on one machine (CPU here, GPUs where present); ZeRO stage, precision,
    # batch sizes, optimizer and schedule come from the JSON:
    deepspeed --num_gpus 2 recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --data data/stdlib --model gpt2-nano --output_dir runs/pretrain --max_steps 200

    # continue it later, from OUTPUT_DIR/checkpoints/latest:
    deepspeed --num_gpus 2 recipes/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --output_dir runs/pretrain --max_steps 400 --resume

Writes OUTPUT_DIR/config.json (the resolved run), metrics.jsonl (one line per log and
evaluation) and checkpoints/step<N>/ with a `latest` tag; with --export_hf DIR, also a
Hugging Face model folder of the final weights, checked against the trained engine.
"""

from dataclasses import asdict
from pathlib import Path

import deepspeed

from gpt_recipes import checkpoint, distributed, ds_config
from gpt_recipes.args import PretrainArgs, parse_args
from gpt_recipes.data import GlobalBatchOrder, PackedTokens, eval_micro_batches, read_meta
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.export import check_output_folder, export_after_training
from gpt_recipes.metrics import MetricsLog
from gpt_recipes.models import build_config, build_model, check_seq_len, count_parameters, describe_presets
from gpt_recipes.prepare import ensure_default_data
from gpt_recipes.run_dir import check_output_dir, write_run_config
from gpt_recipes.tokenizer import load_tokenizer
from gpt_recipes.train import Batches, LoopConfig, TrainState, train


def check_intervals(args: PretrainArgs) -> None:
    for name in ("max_steps", "log_interval", "eval_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 (only at the end) or positive, got {getattr(args, name)}")


@cli_entry
def main() -> None:
    args = parse_args(PretrainArgs, description=__doc__)
    if args.list_models:
        print(describe_presets())
        return
    env = distributed.environment()
    say = print if env.is_main else (lambda *_: None)

    # 1. Check every input before any rank starts: config, data, tokenizer, model, output.
    check_intervals(args)
    device = distributed.device_type()
    ds_cfg, plan, filled = ds_config.resolve(args.deepspeed_config, env.world_size, args.max_steps, device)
    ensure_default_data(args.data)
    meta = read_meta(args.data)
    tokenizer = load_tokenizer(meta.tokenizer_dir)
    model_config = build_config(args.model, len(tokenizer), tokenizer.eos_token_id)
    seq_len = check_seq_len(model_config, args.seq_len)
    train_tokens = PackedTokens(meta.split_path("train"), meta.dtype, seq_len)
    val_tokens = PackedTokens(meta.split_path("val"), meta.dtype, seq_len)
    order = GlobalBatchOrder(len(train_tokens), plan, args.seed)
    val_batches = eval_micro_batches(len(val_tokens), args.eval_batches * plan.global_batch, plan.micro_batch,
                                     env.rank, env.world_size)
    if not val_batches:
        raise UserError(f"the validation split of {args.data} holds fewer than {env.world_size} samples of "
                        f"{seq_len + 1} tokens; prepare with a larger --val_fraction")
    out_dir = Path(args.output_dir)
    can_resume = check_output_dir(out_dir, args.resume, args.overwrite)
    if args.export_hf:
        check_output_folder(Path(args.export_hf), args.overwrite, force_flag="--overwrite")

    # 2. Start the ranks and build the model (same seed everywhere, so replicas start equal).
    distributed.init(env)
    distributed.barrier()  # every rank has checked the output folder before rank 0 writes to it
    distributed.seed_everything(args.seed)
    model = build_model(model_config)
    say(f"Model {args.model}: {count_parameters(model) / 1e6:.2f}M parameters; seq_len {seq_len}; "
        f"{ds_config.precision(ds_cfg)}, ZeRO-{ds_config.zero_stage(ds_cfg)}; global batch {plan.global_batch} = "
        f"{plan.micro_batch} micro x {plan.grad_accum} accumulation x {plan.world_size} ranks")
    for key, value in filled.items():
        say(f"DeepSpeed config: filled {key} = {value} (was \"auto\")")

    # 3. Wrap it in the DeepSpeed engine; resume if asked and a checkpoint exists.
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    state = TrainState()
    if can_resume:
        saved = checkpoint.load(engine, out_dir, env.rank)
        if saved["global_batch"] != plan.global_batch or saved["seq_len"] != seq_len:
            raise UserError(
                f"checkpoint was written with global batch {saved['global_batch']} and seq_len {saved['seq_len']}; "
                f"this run has {plan.global_batch} and {seq_len}: keep them to resume"
            )
        state = TrainState(step=saved["step"], tokens=saved["tokens"])
        say(f"Resumed from step {state.step} ({state.tokens:,} tokens seen)")
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(out_dir, {
            "args": asdict(args), "seq_len": seq_len, "world_size": env.world_size,
            "batch": {"micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                      "global_batch": plan.global_batch, "tokens_per_step": plan.global_batch * seq_len},
            "deepspeed": ds_cfg, "filled_auto": filled, "model": model_config.to_dict(),
            "parameters": count_parameters(model), "data": meta.raw,
        })
    metrics = MetricsLog(out_dir, env.is_main, resume_step=state.step if can_resume else None)

    # 4. Train, evaluating and saving along the way.
    loop = LoopConfig(max_steps=args.max_steps, seq_len=seq_len, log_interval=args.log_interval,
                      eval_interval=args.eval_interval, save_interval=args.save_interval, out_dir=out_dir,
                      device_type=device)
    trainer_extra = {"global_batch": plan.global_batch, "seq_len": seq_len, "seed": args.seed}
    training_info = {"precision": ds_config.precision(ds_cfg), "zero_stage": ds_config.zero_stage(ds_cfg),
                     "world_size": env.world_size}

    def save(s: TrainState) -> Path:
        return checkpoint.save(engine, out_dir, s.as_dict(**trainer_extra), env.rank, [model_config, tokenizer],
                               training_info)

    train(engine, Batches(train_tokens, order, val_tokens, val_batches), plan, env, loop, state, metrics, save)

    # 5. Optionally export the final checkpoint to a Hugging Face folder, checked against the engine.
    if args.export_hf:
        record = export_after_training(engine, out_dir, Path(args.export_hf), model_config, tokenizer.eos_token_id,
                                       ds_config.zero_stage(ds_cfg), env.is_main, force=args.overwrite)
        metrics.write({"step": state.step, **(record or {})})
        distributed.barrier()
    say(f"Done: {state.step} steps, {state.tokens:,} tokens; outputs in {out_dir}")


if __name__ == "__main__":
    main()
