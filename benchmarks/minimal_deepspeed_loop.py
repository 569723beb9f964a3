#!/usr/bin/env python
"""The second reference for benchmarks/benchmark.py: DeepSpeed's engine and nothing else.

    deepspeed --num_gpus 2 benchmarks/minimal_deepspeed_loop.py --deepspeed_config ds_configs/zero2.json \\
        --model gpt2-micro --seq_len 256 --output_dir runs/minimal

`deepspeed.initialize` on the recipe's model (same preset, seed and initialisation), its data
windows and global batch order, and the same JSON as resolved by the recipe; then each step
is forward and loss, `engine.backward`, `engine.step`. No evaluation, checkpoints, stop
signals, progress bar or probes; the loss is read once per log line. Its step time against
the plain PyTorch loop's is DeepSpeed's own cost at that JSON; the recipe's against this
one's is the recipe's own cost.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import deepspeed
import torch

from gpt_recipes import ds_config
from gpt_recipes.args import flag, parse_args
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.data.tokens import GlobalBatchOrder, PackedTokens, read_meta
from gpt_recipes.errors import cli_entry
from gpt_recipes.metrics import flops
from gpt_recipes.metrics.log import MetricsLog
from gpt_recipes.metrics.memory import peak_memory_mb
from gpt_recipes.metrics.profile import profiled_step
from gpt_recipes.metrics.throughput import ThroughputWindow, speed_text
from gpt_recipes.models.causal_lm import build_config, build_model, check_seq_len
from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable
from gpt_recipes.parallel.distributed import environment, free_port, seed_everything


@dataclass
class MinimalLoopArgs:
    """DeepSpeed's engine on the recipe's model and data, with nothing around it (a benchmark reference)."""

    deepspeed_config: str = flag("ds_configs/zero2.json", "DeepSpeed JSON, as given to the recipe")
    data: str = flag("data/stdlib", "folder written by tools/prepare_data.py")
    model: str = flag("gpt2-micro", "model preset name or a model config JSON")
    seq_len: Optional[int] = flag(256, "tokens per sample")
    max_steps: int = flag(30, "optimizer steps")
    log_interval: int = flag(5, "steps between metrics lines")
    fused_loss: bool = flag(True, "the recipe's fused output layer and loss where it applies (not at ZeRO-3)")
    torch_compile: bool = flag(False, "compile the model through DeepSpeed (engine.compile, inductor)")
    profile_step: int = flag(0, "record this step with torch.profiler, as the recipes' --profile_step does (0: none)")
    seed: int = flag(1234, "seed for initialisation and the data order")
    peak_tflops: Optional[float] = flag(None, "peak TFLOP/s per device for MFU (default: table or CPU probe)")
    output_dir: str = flag("runs/minimal", "folder for metrics.jsonl")
    local_rank: int = flag(-1, "set by the deepspeed launcher")


@cli_entry
def main() -> None:
    args = parse_args(MinimalLoopArgs, description=__doc__)
    env = environment()
    device_type = deepspeed.get_accelerator().device_name()
    cfg, plan, _ = ds_config.resolve(args.deepspeed_config, env.world_size, args.max_steps, device_type)
    if device_type == "cpu":  # as every launcher leaves it: one thread per core, split among the ranks
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    if "MASTER_ADDR" not in os.environ:  # a bare `python` run: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    deepspeed.init_distributed()
    seed_everything(args.seed)

    meta = read_meta(args.data)
    config = build_config(args.model, len(load_tokenizer(meta.tokenizer_dir)), 0)
    seq_len = check_seq_len(config, args.seq_len)
    train = PackedTokens(meta.split_files("train"), meta.dtype, seq_len)
    order = GlobalBatchOrder(len(train), plan, args.seed)
    model = build_model(config, cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    if args.torch_compile:
        engine.compile()
    stage = ds_config.zero_stage(cfg)
    loss_fn = CausalLMLoss(engine.module, fused=args.fused_loss and fused_unavailable(engine.module, stage) is None)

    precision = ds_config.precision(cfg)
    flops_per_token = flops.flops_shape(config).per_token(seq_len)
    peak, source = flops.peak_tflops(device_type, precision, args.peak_tflops)
    out = Path(args.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"minimal DeepSpeed: {args.model}, {env.world_size} rank(s), ZeRO-{stage}, {precision}, global batch "
              f"{plan.global_batch} x {seq_len}; {'fused' if loss_fn.fused else 'plain'} loss"
              f"{'; compiled' if args.torch_compile else ''}; MFU peak {peak} "
              f"TFLOP/s ({source})", flush=True)
    metrics = MetricsLog(out, enabled=env.is_main)
    window = ThroughputWindow(flops_per_token, env.world_size, peak, plan.global_batch)
    tokens, step_tokens = 0, plan.global_batch * seq_len
    for step in range(args.max_steps):
        profiling = step + 1 == args.profile_step
        with (profiled_step(step + 1, out, device_type, env.is_main) if profiling else contextlib.nullcontext()), \
                window.paused() if profiling else contextlib.nullcontext():
            for micro_step in range(plan.grad_accum):
                inputs, targets = train.batch(order.micro_batch(step, env.rank, micro_step))
                inputs = {k: v.to(engine.device) for k, v in inputs.items()}
                loss = loss_fn(engine, inputs, targets.to(engine.device))
                engine.backward(loss)
                engine.step()
        tokens += step_tokens
        window.add_step(step_tokens, timed=not profiling)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.max_steps:
            loss_value = loss.item()  # waits for the device, once per log line
            record = {"step": step + 1, "tokens": tokens, "loss": loss_value, **window.record(),
                      "peak_mem_mb": peak_memory_mb(device_type)}
            metrics.write(record)
            if env.is_main:
                print(f"step {step + 1:>6d} | loss {loss_value:.4f} | {speed_text(record)}", flush=True)
            window.reset()
    # Left to shutdown, its threads aborted the exit in 1 of 6 runs (-6); closed here, 12 of 12 clean.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
