#!/usr/bin/env python
"""Benchmark the recipe at ZeRO 0-3 against a plain PyTorch loop and a minimal DeepSpeed loop
on the same model, data and batch.

    python benchmarks/benchmark.py                                  # GPT-2 6L/384 (gpt2-micro), fp32, 2 ranks
    python benchmarks/benchmark.py --precision bf16 --repeats 3 --markdown
    python benchmarks/benchmark.py --model gpt2 --precision bf16 --ranks 1 --global_batch 8 --seq_len 1024   # one GPU
    # the overhead-bound case: steps of a few milliseconds, where fixed per-step costs show
    python benchmarks/benchmark.py --ranks 1 --model gpt2-nano --seq_len 32 --global_batch 2 --max_steps 60 \\
        --log_interval 10 --repeats 3

Three references per ZeRO stage, so that each cost has a name:
  plain PyTorch        the model, data and global batch order in a bare loop (DDP over RANKS ranks);
  minimal DeepSpeed    benchmarks/minimal_deepspeed_loop.py: `deepspeed.initialize` with the same
                       JSON, then forward, engine.backward, engine.step and nothing else. Its gap
                       to the plain loop is DeepSpeed's own cost at that JSON;
  recipe               recipes/pretrain.py with the same JSON. Its gap to the minimal loop is the
                       recipe's own cost (evaluation and saving are kept out of its throughput).
Each JSON is ds_configs/zero<N>.json (or each of --configs) changed only in batch layout and
precision. With --torch_compile, every run is also made compiled (torch.compile, inductor).
Runs go in order and `--repeats` times over (interleaved, so drifts in machine speed hit
every variant alike). The plain loops clip gradients as the JSONs do, step torch's fused AdamW
and take the recipe's fused loss unless --no-fused_loss. On a CPU, the matmul peak for MFU is
probed once, here, with a rank's share of the cores, and given to every run. Prints the
median tokens/s and ms per step of each (warm-up left out), TFLOP/s, MFU, peak memory, the
ratio to the plain loop and, for the recipe, to the minimal loop with the same JSON; with
the machine and the versions.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from gpt_recipes.args import flag, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.launch import REPO, ComparisonArgs, launcher_prefix, master_port, run_pretrain, unbuffered_env
from gpt_recipes.metrics import flops
from gpt_recipes.metrics.profile import format_summary
from gpt_recipes.metrics.summary import RunSummary, summarize


@dataclass
class BenchmarkArgs(ComparisonArgs):
    """Benchmark the recipe at each ZeRO stage against a plain PyTorch loop and a minimal DeepSpeed loop."""

    model: str = flag("gpt2-micro", "model preset or config JSON")
    data: str = flag("data/stdlib", "prepared data folder")
    seq_len: int = flag(256, "tokens per sample")
    global_batch: int = flag(8, "samples per optimizer step over all ranks")
    precision: str = flag("fp32", "training precision for every run", choices=["fp32", "bf16"])
    stages: list[int] = flag([0, 1, 2, 3], "ZeRO stages to run (ds_configs/zero<N>.json)")
    configs: list[str] = flag([], "DeepSpeed JSONs to run instead of the --stages ones (e.g. "
                                  "ds_configs/zero3_one_gpu.json)")
    log_interval: int = flag(5, "steps between metrics lines (the first is warm-up)")
    repeats: int = flag(1, "rounds over all variants; figures are medians over rounds")
    fused_loss: bool = flag(True, "the recipe and the reference loops fuse the output layer into the loss")
    torch_compile: bool = flag(False, "also run every variant compiled with torch.compile (inductor)")
    eager: bool = flag(True, "run the eager variants (--no-eager with --torch_compile: compiled ones only)")
    ablate_loss: bool = flag(False, "also run the first stage's recipe with the loss taken from the logits")
    ablate_comm: bool = flag(False, "also run the first stage's recipe with gloo collectives (--no-shm_comm)")
    profile_step: int = flag(0, "record this step of every minimal DeepSpeed and recipe run with torch.profiler and "
                                "print the summaries (top kernels, device-to-host copies, host waits) after the table")
    peak_tflops: Optional[float] = flag(None, "peak TFLOP/s per device for MFU (default: table or CPU probe)")
    output_dir: str = flag("runs/benchmark", "run folders go here (replaced)")
    report_only: bool = flag(False, "run nothing: print the table from the run folders an earlier benchmark with "
                                    "the same flags left in --output_dir")


@dataclass
class Variant:
    """One row of the table: which loop, on how many ranks, with which JSON and flags."""

    name: str
    kind: str  # "plain", "minimal" or "recipe"
    ranks: int
    config: Path | None = None
    extra: list[str] = field(default_factory=list)
    compare_to: str | None = None  # the minimal loop's row with the same JSON (recipe rows)

    def run_dir(self, out: Path, round_: int) -> Path:
        return out / f"{self.name.replace(' ', '_').replace(',', '')}_r{round_}"


def benchmark_config(source: Path, precision: str, micro_batch: int, path: Path) -> Path:
    """SOURCE changed only in batch layout (one micro-batch per rank per step) and precision."""
    cfg = json.loads(source.read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1)
    cfg.pop("train_batch_size", None)
    cfg.pop("fp16", None)
    if precision == "fp32":
        cfg.pop("bf16", None)
    else:
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": True}
    path.write_text(json.dumps(cfg, indent=2))
    return path


def common_flags(args: BenchmarkArgs) -> list[str]:
    return ["--model", args.model, "--data", args.data, "--seq_len", str(args.seq_len), "--max_steps",
            str(args.max_steps), "--log_interval", str(args.log_interval),
            *([] if args.fused_loss else ["--no-fused_loss"])]


def run_script(script: str, args: BenchmarkArgs, variant: Variant, out: Path, peak: float | None) -> int:
    """One reference loop (plain or minimal DeepSpeed); its log lines stream through."""
    with master_port() as port:
        launcher = ([sys.executable] if variant.kind == "plain" and variant.ranks == 1 else
                    launcher_prefix("torchrun" if variant.kind == "plain" else "deepspeed", variant.ranks, port))
        cmd = [*launcher, str(REPO / "benchmarks" / script), *common_flags(args), "--output_dir", str(out),
               *variant.extra, *(["--peak_tflops", str(peak)] if peak else [])]
        if variant.kind == "plain":
            cmd += ["--global_batch", str(args.global_batch), "--precision", args.precision]
        else:
            cmd += ["--deepspeed_config", str(variant.config)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=unbuffered_env())
    for line in proc.stdout.splitlines():
        if proc.returncode or line.startswith(("step ", "plain PyTorch", "minimal DeepSpeed", "compiled", "error:")):
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


def variants(args: BenchmarkArgs, out: Path, micro: int) -> list[Variant]:
    """The table's rows, in the order they run within a round."""
    sources = ([Path(c) for c in args.configs] if args.configs else
               [REPO / "ds_configs" / f"zero{s}.json" for s in args.stages])
    for source in sources:
        if not source.is_file():
            raise UserError(f"DeepSpeed config {source} does not exist")
    clip = json.loads(sources[0].read_text()).get("gradient_clipping", 0.0) if sources else 1.0
    modes = ([("", [])] if args.eager else []) + ([(", compiled", ["--torch_compile"])] if args.torch_compile else [])
    rows: list[Variant] = []
    for suffix, compile_flag in modes:
        rows.append(Variant(f"plain PyTorch{' DDP x%d' % args.ranks if args.ranks > 1 else ''}{suffix}", "plain",
                            args.ranks, extra=["--grad_clip", str(clip), *compile_flag]))
        if args.ranks > 1 and not suffix:
            rows.append(Variant("plain PyTorch, 1 process", "plain", 1, extra=["--grad_clip", str(clip)]))
        for source in sources:
            label = source.stem.replace("zero", "ZeRO-") if not args.configs else source.name
            cfg = benchmark_config(source, args.precision, micro, out / f"{source.stem}_{args.precision}.json")
            profile = ["--profile_step", str(args.profile_step)] if args.profile_step else []
            minimal = Variant(f"minimal DeepSpeed {label}{suffix}", "minimal", args.ranks, cfg, [*compile_flag, *profile])
            rows += [minimal, Variant(f"recipe {label}{suffix}", "recipe", args.ranks, cfg, [*compile_flag, *profile],
                                      minimal.name)]
    first = next((r for r in rows if r.kind == "recipe"), None)
    if first is not None and args.ablate_loss and args.fused_loss:
        rows.append(Variant(f"{first.name}, logits loss", "recipe", args.ranks, first.config,
                            [*first.extra, "--no-fused_loss"], first.compare_to))
    if first is not None and args.ablate_comm and args.ranks > 1:
        rows.append(Variant(f"{first.name}, gloo", "recipe", args.ranks, first.config, [*first.extra, "--no-shm_comm"],
                            first.compare_to))
    return rows


@cli_entry
def main() -> None:
    args = parse_args(BenchmarkArgs, description=__doc__)
    args.check_counts("repeats", "global_batch", "seq_len", "log_interval")
    if args.global_batch % args.ranks:
        raise UserError(f"--global_batch {args.global_batch} is not divisible by --ranks {args.ranks}")
    if not args.eager and not args.torch_compile:
        raise UserError("--no-eager leaves nothing to run; add --torch_compile")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    micro = args.global_batch // args.ranks
    probe = args.peak_tflops is None and not torch.cuda.is_available() and not args.report_only
    peaks = {n: probe_cpu_peak(args.precision, n) for n in sorted({1, args.ranks})} if probe else {}

    def peak_for(ranks: int) -> float | None:
        return args.peak_tflops or peaks.get(ranks)

    recipe_args = [*common_flags(args), "--eval_interval", "0", "--eval_batches", "1", "--overwrite",
                   *(["--peak_tflops", str(peak_for(args.ranks))] if peak_for(args.ranks) else [])]
    rows = variants(args, out, micro)
    reference = rows[0].name
    results: dict[str, list[RunSummary | None]] = {v.name: [] for v in rows}  # None: that round's run failed
    notes: list[str] = []

    for round_ in range(1, args.repeats + 1):
        for variant in rows:
            run_dir = variant.run_dir(out, round_)
            if args.report_only:
                results[variant.name].append(summarize(run_dir, variant.name))
                continue
            print(f"[round {round_}/{args.repeats}] {variant.name}", flush=True)
            if variant.kind == "recipe":
                code = run_pretrain(variant.config, run_dir, args.ranks, [*recipe_args, *variant.extra],
                                    quiet=True).returncode
            else:
                script = "plain_pytorch_loop.py" if variant.kind == "plain" else "minimal_deepspeed_loop.py"
                code = run_script(script, args, variant, run_dir, peak_for(variant.ranks))
            results[variant.name].append(kept_summary(run_dir, variant.name, code, args.max_steps, round_, notes))
    if not any(s is not None for runs in results.values() for s in runs):
        raise UserError("every run of the benchmark failed; see their output above")

    table, over = results_table(rows, results, reference)
    print(f"\n{args.model}, seq_len {args.seq_len}, global batch {args.global_batch}, {args.precision}, "
          f"{args.ranks} rank(s); median over {args.repeats} round(s) of each run's median tokens/s "
          f"(steps {args.log_interval + 1}-{args.max_steps}); vs plain / vs minimal DS: median of each round's ratio")
    print(f"Machine: {machine()}")
    print(f"Command: python benchmarks/benchmark.py {' '.join(sys.argv[1:])}".rstrip())
    print_table(HEADER, table, args.markdown)
    if over:
        notes.append(f"MFU above 100% ({', '.join(over)}): the matmul probe that set the peak ran slower than these "
                     "runs, as on a machine busy with something else at the start; rerun on an idle machine, or pass "
                     "--peak_tflops")
    for note in notes:
        print(f"note: {note}")
    if args.profile_step:
        for variant in rows:
            summary = variant.run_dir(out, 1) / "profile" / f"step{args.profile_step}.json"
            if summary.is_file():
                print(f"\n{variant.name}: " + format_summary(json.loads(summary.read_text())))


HEADER = ["run", "tokens/s", "step ms", "vs plain", "range over rounds", "vs minimal DS", "TFLOP/s/rank", "MFU",
          "peak MiB/rank", "compile s"]


def results_table(rows: list[Variant], results: dict[str, list[RunSummary | None]],
                  reference: str) -> tuple[list[list[str]], list[str]]:
    """The table's cells, one row per variant (medians over rounds), and the rows whose MFU passed 100%."""

    def median(name: str, key: str) -> float | None:
        values = [getattr(s, key, None) for s in results[name] if getattr(s, key, None) is not None]
        return statistics.median(values) if values else None

    def ratio(name: str, other: str) -> tuple[float, float, float] | None:
        """Median, min and max over rounds of tokens/s against another row's in the same round:
        a round's runs are minutes apart, so drifts in machine speed cancel out."""
        ratios = [s.tokens_per_sec / r.tokens_per_sec for s, r in zip(results[name], results[other])
                  if s is not None and r is not None and s.tokens_per_sec and r.tokens_per_sec]
        return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None

    table = []
    for variant in rows:
        name = variant.name
        if median(name, "tokens_per_sec") is None:
            table.append([name, "failed", *[""] * (len(HEADER) - 2)])
            continue
        mfu, compile_s = median(name, "mfu"), median(name, "compile_s")
        against = ratio(name, reference)
        versus = ratio(name, variant.compare_to) if variant.compare_to else None
        table.append([name, f"{median(name, 'tokens_per_sec'):.0f}", f"{median(name, 'step_time_ms'):.1f}",
                      f"{against[0]:.1%}" if against else "-", f"{against[1]:.0%}–{against[2]:.0%}" if against else "-",
                      f"{versus[0]:.1%}" if versus else "",
                      f"{median(name, 'tflops_per_rank'):.3g}", "-" if mfu is None else f"{mfu:.1%}",
                      f"{median(name, 'peak_mem_mb'):.0f}", "" if compile_s is None else f"{compile_s:.0f}"])
    return table, [v.name for v in rows if (median(v.name, "mfu") or 0) > 1]


def kept_summary(run_dir: Path, name: str, code: int, max_steps: int, round_: int,
                 notes: list[str]) -> RunSummary | None:
    """A run's figures; a run that failed after logging its last step (a crash in its teardown) keeps
    them, one that failed before does not; either is noted, and the other rounds go on."""
    summary = summarize(run_dir, name) if (run_dir / "metrics.jsonl").is_file() else None
    if code == 0:
        return summary
    if summary is not None and summary.steps >= max_steps:
        notes.append(f"{name}, round {round_}: exited with status {code} after logging all {max_steps} steps (a "
                     "crash while shutting down); its figures are kept")
        return summary
    notes.append(f"{name}, round {round_}: failed (exit {code}) before its last step; left out of that round "
                 "(its output is above)")
    return None


def print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
