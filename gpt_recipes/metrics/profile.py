"""One optimizer step under torch.profiler: where its time went, and what made the host wait.

`--profile_step N` (the recipes and benchmarks/minimal_deepspeed_loop.py) records step N and
writes OUTPUT_DIR/profile/step<N>.json (the summary below) and step<N>.trace.json (a Chrome
trace for chrome://tracing or Perfetto). The summary holds the top operators by self time
on the device (GPU kernels) or, on a CPU, by self CPU time, and the counts that tell a
step which waits on its host: device-to-host copies and stream, event or device
synchronisations. On a CPU both counts are 0 by nature.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

# CUDA runtime calls that block the host until the device catches up.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP = 12


@contextlib.contextmanager
def profiled_step(step: int, out_dir: Path, device_type: str, write: bool) -> Iterator[None]:
    """Profile the block (one optimizer step); rank 0 (`write`) saves and returns the summary in files."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    if write:
        folder = out_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        summary = summarize(prof, device_type, step)
        (folder / f"step{step}.json").write_text(json.dumps(summary, indent=2))
        prof.export_chrome_trace(str(folder / f"step{step}.trace.json"))
        print(format_summary(summary), flush=True)


def summarize(prof: Any, device_type: str, step: int) -> dict[str, Any]:
    events = prof.key_averages()
    on_device = device_type == "cuda"

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if on_device else e.self_cpu_time_total)

    top = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)[:TOP]
    total = sum(self_us(e) for e in events)
    count = {e.key: e.count for e in events}
    return {
        "step": step,
        "device": device_type,
        "time_basis": "device time (kernels)" if on_device else "self CPU time",
        "total_ms": total / 1e3,
        "top": [{"name": e.key, "ms": self_us(e) / 1e3, "calls": e.count} for e in top],
        "device_to_host_copies": sum(n for key, n in count.items() if "DtoH" in key or "Device -> Pageable" in key),
        "host_waits": {name: count.get(name, 0) for name in WAITS},
        "cuda_launches": sum(n for key, n in count.items() if key in ("cudaLaunchKernel", "cudaLaunchKernelExC")),
    }


def format_summary(summary: dict[str, Any]) -> str:
    waits = ", ".join(f"{k} {v}" for k, v in summary["host_waits"].items())
    lines = [f"profile of step {summary['step']}: {summary['total_ms']:.1f} ms of {summary['time_basis']}; "
             f"device-to-host copies {summary['device_to_host_copies']}; {waits}; "
             f"kernel launches {summary['cuda_launches']}"]
    lines += [f"  {row['ms']:9.2f} ms  {row['calls']:6d} x  {row['name'][:90]}" for row in summary["top"]]
    return "\n".join(lines)
