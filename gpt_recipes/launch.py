"""Start recipes as a user does, as subprocesses under `deepspeed`, `torchrun` or `accelerate`
(run as modules of this interpreter) on this machine: each launch on a free port, with DeepSpeed's shared-memory buffers of that
port removed afterwards. Used by the sweep and benchmark tools and by the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gpt_recipes.args import flag
from gpt_recipes.console import with_own_scripts
from gpt_recipes.errors import UserError
from gpt_recipes.parallel.distributed import free_port, remove_shm_buffers

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("deepspeed", "torchrun", "accelerate")


# The launchers as modules of this interpreter (`deepspeed`, `torchrun`, `accelerate launch` are
# scripts that run them): the environment that runs the tool or test is the one the ranks get.
LAUNCHER_MODULES = {"deepspeed": "deepspeed.launcher.runner", "torchrun": "torch.distributed.run",
                    "accelerate": "accelerate.commands.launch"}


def launcher_prefix(launcher: str, ranks: int, port: int) -> list[str]:
    """The command that starts `ranks` ranks of a script on this machine, before the script's path."""
    flags = {
        "deepspeed": ["--num_gpus", str(ranks), "--master_port", str(port)],
        "torchrun": ["--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port)],
        "accelerate": ["--num_processes", str(ranks), "--main_process_port", str(port)],
    }[launcher]
    return [sys.executable, "-m", LAUNCHER_MODULES[launcher], *flags]


@contextlib.contextmanager
def master_port() -> Iterator[int]:
    """A free port for one launch; afterwards (also after a run that was killed) the shared-memory
    buffers DeepSpeed's CPU collectives keyed to it are removed."""
    port = free_port()
    try:
        yield port
    finally:
        remove_shm_buffers("127.0.0.1", str(port), marks=True)


def unbuffered_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the ranks' output unbuffered so it streams in order (and,
    on a machine without a GPU, DeepSpeed's CPU accelerator named, so it does not say it looked)."""
    import shutil

    accelerator = {} if shutil.which("nvidia-smi") or "DS_ACCELERATOR" in os.environ else {"DS_ACCELERATOR": "cpu"}
    return {**os.environ, "PATH": with_own_scripts(os.environ.get("PATH")), "PYTHONUNBUFFERED": "1", **accelerator,
            **extra}


@dataclass
class ComparisonArgs:
    """Flags of the tools that run a recipe once per setting and compare the runs."""

    output_dir: str = flag("runs/compare", "one run folder per setting is written under this folder")
    ranks: int = flag(2, "ranks per run (deepspeed --num_gpus: GPUs, or processes on a CPU)")
    max_steps: int = flag(30, "steps per run")
    markdown: bool = flag(False, "print the table as Markdown")

    def check_counts(self, *more: str) -> None:
        for name in ("ranks", "max_steps", *more):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class SweepRun:
    config: Path
    out_dir: Path
    returncode: int


def run_recipe(recipe: str, config: Path, out_dir: Path, ranks: int, recipe_args: list[str],
               quiet: bool = False) -> SweepRun:
    """One `deepspeed --num_gpus RANKS recipes/<recipe>.py` run; its output streams through
    (or only the recipe's own lines when quiet)."""
    with master_port() as port:
        cmd = [*launcher_prefix("deepspeed", ranks, port), str(REPO / "recipes" / f"{recipe}.py"),
               "--deepspeed_config", str(config), "--output_dir", str(out_dir), *recipe_args]
        if quiet:
            proc = subprocess.run(cmd, env=unbuffered_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            failed = proc.returncode != 0
            for line in proc.stdout.splitlines():
                if failed or line.startswith(("step ", "Model:", "LoRA:", "FLOPs:", "memory,", "error:")):
                    print(f"  {line}", flush=True)
        else:
            proc = subprocess.run(cmd, env=unbuffered_env(), stdout=sys.stdout, stderr=sys.stderr)
    return SweepRun(config, out_dir, proc.returncode)


def run_pretrain(config: Path, out_dir: Path, ranks: int, recipe_args: list[str], quiet: bool = False) -> SweepRun:
    return run_recipe("pretrain", config, out_dir, ranks, recipe_args, quiet)
