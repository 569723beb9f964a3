"""Run the recipes as users do: real processes under the deepspeed launcher, CPU + gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from gpt_recipes.distributed import remove_shm_buffers

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], ranks: int = 2, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS script args...` from the repository root; returns the finished process."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers("127.0.0.1", str(port))  # also after runs the tests kill on purpose
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python script args...` from the repository root, without a launcher."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]
