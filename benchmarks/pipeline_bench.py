#!/usr/bin/env python
"""A 2-stage pipeline against data parallelism over the same ranks, at the same global batch, and
the pipeline's bubble measured against (P - 1) / (m + P - 1).

    python benchmarks/pipeline_bench.py                              # gpt2-micro, bf16, 2 ranks, m = 2 4 8
    python benchmarks/pipeline_bench.py --model gpt2-nano --seq_len 64 --max_steps 12   # a quick look

For each m (micro-batches in flight), two runs of recipes/pretrain.py on `--ranks` ranks:
  pipeline   ds_configs/zero1_pp2.json (P = 2 stages, ZeRO-1), gradient_accumulation_steps m:
             each step pushes m micro-batches through the two stages (1F1B);
  data       ds_configs/zero1.json with every rank a data-parallel replica and m / 2 accumulation
             steps: the same micro-batch and global batch.
Prints the median tokens/s and ms per step (the first log window left out as warm-up) and the
fullest rank's peak memory. The bubble is measured from the pipeline's step times T(m): a fit of
T(m) = a + t * m gives the time t of one micro-batch through one stage, and 1 - m * t / T(m) is
the part of a step not spent computing micro-batches (bubble, plus the optimizer step and the
stages' exchanges), beside the formula's share.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpt_recipes.args import flag, parse_args
from gpt_recipes.launch import REPO, launcher_prefix, master_port, unbuffered_env
from gpt_recipes.parallel.pipeline import bubble


@dataclass
class PipelineBenchArgs:
    """Time a 2-stage pipeline against data parallelism at the same global batch."""

    model: str = flag("gpt2-micro", "model preset or config JSON")
    data: str = flag("data/stdlib", "prepared data folder")
    seq_len: int = flag(256, "tokens per sample")
    micro_batch: int = flag(2, "samples per micro-batch")
    micro_batches: list[int] = flag([2, 4, 8], "micro-batches in flight (m) to measure; even, so data "
                                    "parallelism over 2 ranks reaches the same global batch")
    ranks: int = flag(2, "ranks (the pipeline's 2 stages x ranks / 2 data-parallel pipelines)")
    max_steps: int = flag(30, "steps per run")
    log_interval: int = flag(5, "steps per log window (the first is warm-up)")
    precision: str = flag("bf16", "bf16 or fp32", choices=["bf16", "fp32"])


def config(source: str, micro: int, accum: int, precision: str, path: Path) -> Path:
    cfg = json.loads((REPO / "ds_configs" / source).read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    if precision == "fp32":
        cfg.pop("bf16", None)
    path.write_text(json.dumps(cfg))
    return path


def run(args: PipelineBenchArgs, cfg: Path, out: Path) -> dict:
    with master_port() as port:
        cmd = [*launcher_prefix("deepspeed", args.ranks, port), str(REPO / "recipes" / "pretrain.py"),
               "--deepspeed_config", str(cfg), "--model", args.model, "--data", args.data, "--seq_len",
               str(args.seq_len), "--max_steps", str(args.max_steps), "--log_interval", str(args.log_interval),
               "--eval_interval", "0", "--eval_batches", "1", "--output_dir", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=unbuffered_env())
    if proc.returncode:
        print(proc.stdout[-3000:])
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r and r.get("step_time")][1:]  # the first window is warm-up
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train),
            "step_ms": 1000 * statistics.median(r["step_time"] for r in train),
            "peak_mb": max(r["peak_mem_mb"] for r in lines if "peak_mem_mb" in r)}


def main() -> None:
    args = parse_args(PipelineBenchArgs, description=__doc__)
    if any(m % 2 for m in args.micro_batches) or args.ranks % 2:
        raise SystemExit("error: --micro_batches and --ranks must be even")
    pipelines = args.ranks // 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for m in args.micro_batches:
            # The same global batch: micro-batch x m x ranks/2 pipelines = micro-batch x m/2 x ranks replicas.
            for kind, source, accum in (("pipeline", "zero1_pp2.json", m), ("data", "zero1.json", m // 2)):
                cfg = config(source, args.micro_batch, accum, args.precision, tmp / f"{kind}{m}.json")
                results[kind, m] = run(args, cfg, tmp / f"{kind}{m}")
                r = results[kind, m]
                print(f"m={m:<2d} {kind:8s} {r['tokens_per_sec']:8.0f} tokens/s {r['step_ms']:8.1f} ms/step "
                      f"peak {r['peak_mb']:6.0f} MiB", flush=True)
    ms = args.micro_batches
    times = [results["pipeline", m]["step_ms"] for m in ms]
    mean_m, mean_t = statistics.mean(ms), statistics.mean(times)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(ms, times)) / sum((m - mean_m) ** 2 for m in ms)
    print(f"\n{args.model}, seq_len {args.seq_len}, micro-batch {args.micro_batch}, {args.precision}, {args.ranks} ranks "
          f"({pipelines} pipeline(s) of 2 stages vs {args.ranks} data-parallel ranks), global batch = micro-batch x m "
          f"x {pipelines}")
    print("| m | pipeline tokens/s | data-parallel tokens/s | pipeline / data | peak MiB pipeline / data | "
          "measured idle share | (P-1)/(m+P-1) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for m in ms:
        p, d = results["pipeline", m], results["data", m]
        idle = 1 - m * slope / p["step_ms"]
        print(f"| {m} | {p['tokens_per_sec']:.0f} | {d['tokens_per_sec']:.0f} | {p['tokens_per_sec'] / d['tokens_per_sec']:.2f}"
              f" | {p['peak_mb']:.0f} / {d['peak_mb']:.0f} | {idle:.0%} | {bubble(2, m):.0%} |")
    print(f"(one micro-batch through one stage: {slope:.1f} ms, from the fit of the pipeline's step times)")


if __name__ == "__main__":
    sys.exit(main())
