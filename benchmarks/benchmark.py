#!/usr/bin/env python
"""Benchmark the recipe at ZeRO 0-3 against a plain PyTorch loop on the same model, data and batch.

    python benchmarks/benchmark.py                                  # GPT-2 6L/384 (gpt2-micro), fp32, 2 ranks
    python benchmarks/benchmark.py --precision bf16 --repeats 3 --markdown
    python benchmarks/benchmark.py --model gpt2 --precision bf16 --ranks 1 --global_batch 16 --seq_len 1024   # one GPU

Runs, in order and `--repeats` times over (interleaved, so drifts in machine speed hit
every variant alike): the plain loop with DistributedDataParallel on RANKS ranks (the
reference), the plain loop as one process (with RANKS ranks), and recipes/pretrain.py with
each ds_configs/zero<N>.json changed only in batch layout and precision. The plain loops
clip gradients as the JSONs do, step torch's fused AdamW and take the recipe's fused loss
unless --no-fused_loss. On a CPU, the matmul peak for MFU is probed once, here, with a
rank's share of the cores, and given to every run. Prints the median
tokens/s of each (warm-up left out), TFLOP/s, MFU, peak memory and the ratio to the
reference, with the machine and the versions.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gpt_recipes.args import flag, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.launch import REPO, ComparisonArgs, launcher_prefix, master_port, run_pretrain, unbuffered_env
from gpt_recipes.metrics import flops
from gpt_recipes.metrics.summary import RunSummary, summarize


@dataclass
class BenchmarkArgs(ComparisonArgs):
    """Benchmark the recipe at each ZeRO stage against a plain PyTorch loop."""

    model: str = flag("gpt2-micro", "model preset or config JSON")
    data: str = flag("data/stdlib", "prepared data folder")
    seq_len: int = flag(256, "tokens per sample")
    global_batch: int = flag(8, "samples per optimizer step over all ranks")
    precision: str = flag("fp32", "training precision for every run", choices=["fp32", "bf16"])
    stages: list[int] = flag([0, 1, 2, 3], "ZeRO stages to run")
    log_interval: int = flag(5, "steps between metrics lines (the first is warm-up)")
    repeats: int = flag(1, "rounds over all variants; figures are medians over rounds")
    fused_loss: bool = flag(True, "the recipe and the plain loop fuse the output layer into the loss")
    ablate_loss: bool = flag(False, "also run the first stage's recipe with the loss taken from the logits")
    ablate_comm: bool = flag(False, "also run the first stage's recipe with gloo collectives (--no-shm_comm)")
    peak_tflops: Optional[float] = flag(None, "peak TFLOP/s per device for MFU (default: table or CPU probe)")
    output_dir: str = flag("runs/benchmark", "run folders go here (replaced)")
    report_only: bool = flag(False, "run nothing: print the table from the run folders an earlier benchmark with "
                                    "the same flags left in --output_dir")


def stage_config(stage: int, precision: str, micro_batch: int, path: Path) -> Path:
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1)
    cfg.pop("train_batch_size", None)
    if precision == "fp32":
        cfg.pop("bf16", None)
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_plain(args: BenchmarkArgs, ranks: int, out: Path, extra: list[str], peak: float | None) -> int:
    script = str(REPO / "benchmarks" / "plain_pytorch_loop.py")
    with master_port() as port:
        launcher = [sys.executable] if ranks == 1 else launcher_prefix("torchrun", ranks, port)
        cmd = [*launcher, script, "--model", args.model, "--data", args.data, "--seq_len", str(args.seq_len),
               "--global_batch", str(args.global_batch), "--precision", args.precision, "--max_steps",
               str(args.max_steps), "--log_interval", str(args.log_interval), "--output_dir", str(out), *extra,
               *(["--peak_tflops", str(peak)] if peak else [])]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=unbuffered_env())
    for line in proc.stdout.splitlines():
        if proc.returncode or line.startswith(("step ", "plain PyTorch", "error:")):
            print(f"  {line}", flush=True)
    return proc.returncode


def probe_cpu_peak(precision: str, ranks: int) -> float:
    """One matmul probe for every run with this many ranks, on the threads one rank gets, so
    all runs share one MFU scale."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cores // ranks))
    try:
        peak, source = flops.peak_tflops("cpu", precision, None)
    finally:
        torch.set_num_threads(threads)
    print(f"MFU peak for every run on {ranks} rank(s): {peak:.3g} TFLOP/s per rank ({source})")
    return peak


def machine() -> str:
    if torch.cuda.is_available():
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    import deepspeed
    import transformers

    return (f"{where}; torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, "
            f"transformers {transformers.__version__}")


@cli_entry
def main() -> None:
    args = parse_args(BenchmarkArgs, description=__doc__)
    args.check_counts("repeats", "global_batch", "seq_len", "log_interval")
    if args.global_batch % args.ranks:
        raise UserError(f"--global_batch {args.global_batch} is not divisible by --ranks {args.ranks}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    micro = args.global_batch // args.ranks
    probe = args.peak_tflops is None and not torch.cuda.is_available() and not args.report_only
    peaks = {n: probe_cpu_peak(args.precision, n) for n in sorted({1, args.ranks})} if probe else {}

    def peak_for(ranks: int) -> float | None:
        return args.peak_tflops or peaks.get(ranks)

    recipe_args = ["--model", args.model, "--data", args.data, "--seq_len", str(args.seq_len), "--max_steps",
                   str(args.max_steps), "--log_interval", str(args.log_interval), "--eval_interval", "0",
                   "--eval_batches", "1", "--overwrite",
                   *(["--peak_tflops", str(peak_for(args.ranks))] if peak_for(args.ranks) else [])]
    clip = json.loads((REPO / "ds_configs" / "zero0.json").read_text()).get("gradient_clipping", 0.0)
    plain_args = ["--grad_clip", str(clip), *([] if args.fused_loss else ["--no-fused_loss"])]
    recipe_args += [] if args.fused_loss else ["--no-fused_loss"]
    reference = f"plain PyTorch DDP x{args.ranks}" if args.ranks > 1 else "plain PyTorch"
    # variant -> (ranks, extra flags) for the plain loops; ZeRO stage and extra flags for the recipe
    plain_runs = {reference: (args.ranks, plain_args)}
    if args.ranks > 1:
        plain_runs["plain PyTorch, 1 process"] = (1, plain_args)
    recipe_runs = {f"recipe ZeRO-{s}": (s, []) for s in args.stages}
    if args.ablate_loss and args.fused_loss and args.stages:
        recipe_runs[f"recipe ZeRO-{args.stages[0]}, logits loss"] = (args.stages[0], ["--no-fused_loss"])
    if args.ablate_comm and args.ranks > 1 and args.stages:
        recipe_runs[f"recipe ZeRO-{args.stages[0]}, gloo"] = (args.stages[0], ["--no-shm_comm"])
    variants = [*plain_runs, *recipe_runs]
    results: dict[str, list[RunSummary]] = {v: [] for v in variants}

    for round_ in range(1, args.repeats + 1):
        for variant in variants:
            run_dir = out / f"{variant.replace(' ', '_').replace(',', '')}_r{round_}"
            if args.report_only:
                results[variant].append(summarize(run_dir, variant))
                continue
            print(f"[round {round_}/{args.repeats}] {variant}", flush=True)
            if variant in plain_runs:
                ranks, extra = plain_runs[variant]
                code = run_plain(args, ranks, run_dir, extra, peak_for(ranks))
            else:
                stage, extra = recipe_runs[variant]
                cfg = stage_config(stage, args.precision, micro, out / f"zero{stage}_{args.precision}.json")
                code = run_pretrain(cfg, run_dir, args.ranks, [*recipe_args, *extra], quiet=True).returncode
            if code != 0:
                raise UserError(f"{variant} failed (exit {code}); see its output above")
            results[variant].append(summarize(run_dir, variant))

    def median(variant: str, key: str) -> float | None:
        values = [getattr(s, key) for s in results[variant] if getattr(s, key) is not None]
        return statistics.median(values) if values else None

    def vs_reference(variant: str) -> tuple[float, float, float]:
        """Median, min and max over rounds of tokens/s against the reference's in the same round:
        a round's runs are minutes apart, so drifts in machine speed cancel out."""
        ratios = [s.tokens_per_sec / r.tokens_per_sec for s, r in zip(results[variant], results[reference])]
        return statistics.median(ratios), min(ratios), max(ratios)

    header = ["run", "tokens/s", "vs reference", "range over rounds", "step ms", "TFLOP/s/rank", "MFU",
              "peak MiB/rank"]
    rows = []
    for variant in variants:
        tps, mfu = median(variant, "tokens_per_sec"), median(variant, "mfu")
        ratio, low, high = vs_reference(variant)
        rows.append([variant, f"{tps:.0f}", f"{ratio:.1%}", f"{low:.0%}–{high:.0%}",
                     f"{median(variant, 'step_time_ms'):.0f}",
                     f"{median(variant, 'tflops_per_rank'):.3g}", "-" if mfu is None else f"{mfu:.1%}",
                     f"{median(variant, 'peak_mem_mb'):.0f}"])
    print(f"\n{args.model}, seq_len {args.seq_len}, global batch {args.global_batch}, {args.precision}, "
          f"{args.ranks} rank(s); median over {args.repeats} round(s) of each run's median tokens/s "
          f"(steps {args.log_interval + 1}-{args.max_steps}); vs reference: median of each round's ratio")
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/benchmark.py {' '.join(sys.argv[1:])}".rstrip())
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
