#!/usr/bin/env python
"""The reference for benchmarks/benchmark.py: a plain PyTorch training loop, no DeepSpeed.

    python benchmarks/plain_pytorch_loop.py --model gpt2-micro --global_batch 8 --output_dir runs/plain
    torchrun --nproc_per_node 2 benchmarks/plain_pytorch_loop.py ...      # DistributedDataParallel

Same model class, data windows and global batch order as the recipe; torch's AdamW
(the fused kernel, on CPU and GPU), bf16 by autocast when asked. Writes metrics.jsonl lines in the
recipes' format (tokens/s, step time, TFLOP/s, MFU, peak memory) so
tools/summarize_throughput.py reads both alike.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from gpt_recipes.args import flag, parse_args
from gpt_recipes.data.prepare import ensure_default_data
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.data.tokens import GlobalBatchOrder, PackedTokens, read_meta
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.metrics import flops
from gpt_recipes.metrics.log import MetricsLog
from gpt_recipes.metrics.memory import peak_memory_mb
from gpt_recipes.metrics.throughput import ThroughputWindow, speed_text
from gpt_recipes.models.causal_lm import build_config, build_model, check_seq_len
from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable
from gpt_recipes.parallel.distributed import environment, seed_everything


@dataclass
class PlainLoopArgs:
    """A plain PyTorch training loop over the recipes' data and models (the benchmark reference)."""

    data: str = flag("data/stdlib", "folder written by tools/prepare_data.py")
    model: str = flag("gpt2-micro", "model preset name or a model config JSON")
    seq_len: Optional[int] = flag(256, "tokens per sample")
    global_batch: int = flag(8, "samples per optimizer step over all ranks")
    precision: str = flag("fp32", "fp32, or bf16 by autocast", choices=["fp32", "bf16"])
    max_steps: int = flag(30, "optimizer steps")
    log_interval: int = flag(5, "steps between metrics lines")
    lr: float = flag(1e-3, "AdamW learning rate (constant)")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off); the recipe's JSONs clip at 1.0")
    fused_loss: bool = flag(True, "the recipe's fused output layer and loss (see gpt_recipes/models/loss.py)")
    torch_compile: bool = flag(False, "compile the model with torch.compile (inductor), as single-file trainers do")
    seed: int = flag(1234, "seed for initialisation and the data order")
    peak_tflops: Optional[float] = flag(None, "peak TFLOP/s per device for MFU (default: table or CPU probe)")
    output_dir: str = flag("runs/plain", "folder for metrics.jsonl")


@cli_entry
def main() -> None:
    args = parse_args(PlainLoopArgs, description=__doc__)
    env = environment()
    if args.global_batch % env.world_size:
        raise UserError(f"--global_batch {args.global_batch} is not divisible by {env.world_size} ranks")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if env.world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    seed_everything(args.seed)

    ensure_default_data(args.data)
    meta = read_meta(args.data)
    config = build_config(args.model, len(load_tokenizer(meta.tokenizer_dir)), 0)
    seq_len = check_seq_len(config, args.seq_len)
    train = PackedTokens(meta.split_files("train"), meta.dtype, seq_len)
    plan = BatchPlan(micro_batch=args.global_batch // env.world_size, grad_accum=1, world_size=env.world_size)
    order = GlobalBatchOrder(len(train), plan, args.seed)

    model = build_model(config, device=device)
    loss_fn = CausalLMLoss(model, fused=args.fused_loss and fused_unavailable(model, 0) is None)
    if args.torch_compile:
        model.compile()
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if cuda else None)
    # torch's fastest AdamW: the fused kernel, which torch has for CPU and CUDA alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    flops_per_token = flops.flops_shape(config).per_token(seq_len)
    peak, source = flops.peak_tflops(device.type, args.precision, args.peak_tflops)

    out = Path(args.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"plain PyTorch: {args.model} (transformers), {env.world_size} rank(s), {args.precision}, global batch "
              f"{args.global_batch} x {seq_len}; {'fused' if loss_fn.fused else 'plain'} loss"
              f"{'; compiled' if args.torch_compile else ''}; MFU peak {peak} TFLOP/s ({source})", flush=True)
    metrics = MetricsLog(out, enabled=env.is_main)
    tokens, window = 0, ThroughputWindow(flops_per_token, env.world_size, peak, args.global_batch)
    for step in range(args.max_steps):
        inputs, targets = train.batch(order.micro_batch(step, env.rank, 0))
        inputs, targets = {k: v.to(device) for k, v in inputs.items()}, targets.to(device)
        with autocast:
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens = args.global_batch * seq_len
        tokens += step_tokens
        window.add_step(step_tokens)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.max_steps:
            loss_value = loss.item()  # waits for the device, once per log line
            record = {"step": step + 1, "tokens": tokens, "loss": loss_value, **window.record(),
                      "peak_mem_mb": peak_memory_mb(device.type)}
            metrics.write(record)
            if env.is_main:
                print(f"step {step + 1:>6d} | loss {loss_value:.4f} | {speed_text(record)}", flush=True)
            window.reset()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
