"""Run a recipe once per DeepSpeed config or setting (same model, data and length) for comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt_recipes.parallel.distributed import free_port, remove_shm_buffers

REPO = Path(__file__).resolve().parents[1]


@dataclass
class SweepRun:
    config: Path
    out_dir: Path
    returncode: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_pretrain(config: Path, out_dir: Path, ranks: int, recipe_args: list[str], quiet: bool = False) -> SweepRun:
    return run_recipe("pretrain", config, out_dir, ranks, recipe_args, quiet)


def run_recipe(recipe: str, config: Path, out_dir: Path, ranks: int, recipe_args: list[str],
               quiet: bool = False) -> SweepRun:
    """One `deepspeed --num_gpus RANKS recipes/<recipe>.py` run; its output streams through
    (or only the recipe's own lines when quiet)."""
    port = str(free_port())
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, str(REPO / "recipes" / f"{recipe}.py"),
           "--deepspeed_config", str(config), "--output_dir", str(out_dir), *recipe_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        if quiet:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            failed = proc.returncode != 0
            for line in proc.stdout.splitlines():
                if failed or line.startswith(("step ", "Model:", "LoRA:", "FLOPs:", "memory,", "error:")):
                    print(f"  {line}", flush=True)
        else:
            proc = subprocess.run(cmd, env=env, stdout=sys.stdout, stderr=sys.stderr)
    finally:
        remove_shm_buffers("127.0.0.1", port)
    return SweepRun(config, out_dir, proc.returncode)
