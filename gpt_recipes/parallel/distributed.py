"""Process-group set-up and the few collectives the loop needs, for any launcher.

The deepspeed launcher, torchrun and `accelerate launch` export RANK, LOCAL_RANK and WORLD_SIZE;
Slurm's srun and MPI launchers their own variables (parallel/launchers.py reads them all); a
plain `python recipes/...` run is a world of one.
"""

from __future__ import annotations

import atexit
import glob
import os
import random
import re
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gpt_recipes import console
from gpt_recipes.parallel import launchers


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment() -> DistEnv:
    """This rank's place, whichever launcher started it (torchrun, deepspeed, accelerate, Slurm's srun,
    an MPI launcher: parallel/launchers.py)."""
    launch = launchers.detect()
    return DistEnv(rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world,
                   local_world_size=launch.local_world)


def device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(env: DistEnv, shm_comm: bool = False) -> str | None:
    """Start the process group (gloo on CPU, NCCL on GPU: DeepSpeed picks from the accelerator).

    With `shm_comm`, CPU ranks on one machine also send their collectives through shared
    memory (gpt_recipes/parallel/shm_comm.py). Returns None if they do, else why not.
    """
    import deepspeed

    from gpt_recipes.parallel import shm_comm as shm
    from gpt_recipes.parallel.cpu_info import keep_cpu_info

    keep_cpu_info()  # before any op loads
    # DeepSpeed builds its ops with the ninja of this environment, found on PATH.
    os.environ["PATH"] = console.with_own_scripts(os.environ.get("PATH"))

    # DeepSpeed's ZeRO collectives call torch APIs that torch now marks deprecated; the
    # warning repeats on every rank and says nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    launch = launchers.detect()
    if launch.world == 1 and "MASTER_ADDR" not in os.environ:  # a bare `python` run: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    for key, value in launch.exports().items():  # srun's or mpirun's ranks, as torch's variables
        os.environ.setdefault(key, value)
    why_not_shm = shm.unavailable(device_type(), env.world_size, env.local_world_size) if shm_comm else "--no-shm_comm"
    if why_not_shm is None:
        shm.prepare(env.world_size)
    if device_type() == "cpu":
        _say_if_building_ops(env)
        # Launchers leave each rank at torch's default thread count; ranks sharing the
        # cores would otherwise oversubscribe them and run several times slower.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env.local_world_size))
        atexit.register(remove_own_shm_buffers)
    else:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().set_device(env.local_rank)
        plain_cuda_arch_list()
    _join_restarted_group()
    with console.quiet_prints():  # DeepSpeed's "built successfully", on every rank and launch
        deepspeed.init_distributed()
    return shm.enable() if why_not_shm is None else why_not_shm


def _join_restarted_group() -> None:
    """A group torchrun restarted (--max_restarts) joins through its own prefix of the launcher's store.

    torch 2.13's env:// rendezvous reuses torchrun's store across restarts without a prefix, so the
    restarted ranks' gloo read the dead ranks' addresses and fail ("Connection refused"); DeepSpeed
    adopts a process group that exists."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    from datetime import timedelta

    from deepspeed.accelerator import get_accelerator

    timeout = timedelta(minutes=30)  # DeepSpeed's default
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    dist.init_process_group(get_accelerator().communication_backend_name(), timeout=timeout,
                            store=dist.PrefixStore(f"gpt_recipes/attempt_{restart}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _say_if_building_ops(env: DistEnv) -> None:
    """DeepSpeed compiles its shared-memory op for CPU ranks on the first launch, silently,
    for about a minute on 2 cores; say so rather than look stuck."""
    from torch.utils.cpp_extension import _get_build_directory

    built = glob.glob(os.path.join(_get_build_directory("deepspeed_shm_comm", verbose=False), "*.so"))
    if not built and env.local_rank == 0:
        print("Building DeepSpeed's shared-memory op for CPU ranks (first launch only; about a minute on 2 cores)",
              flush=True)


def plain_cuda_arch_list() -> None:
    """Strip architecture-specific suffixes (9.0a, 10.0f) from TORCH_CUDA_ARCH_LIST, which CUDA
    images often set: DeepSpeed 0.19's op builder parses each entry as numbers and fails
    (`invalid literal for int() with base 10: '0a'`) when it JIT-builds FusedAdam. The ops it
    builds use none of those features."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        plain = dict.fromkeys(re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", a) for a in re.split(r"[;\s]+", archs) if a)
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(plain)


def remove_own_shm_buffers() -> None:
    """This run's shared-memory buffers (see remove_shm_buffers); at exit, or before a rank is
    stopped at once by a second interrupt, when no exit handler runs."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        remove_shm_buffers(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])


def remove_shm_buffers(addr: str, port: str, marks: bool = False) -> None:
    """Unlink the shared-memory buffers DeepSpeed's CPU communication creates for this run.

    DeepSpeed never removes /dev/shm/deepspeed_allreduce_buffer_*_<addr>_<port>_<rank> (69 MB
    per rank here), so every run would leave them behind until memory runs out. Unlinking
    only drops the names; ranks still running keep their mappings.
    """
    # `marks`: also the mark a rank leaves its peers as it ends (train/preemption.py), once all have ended.
    for path in [*glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"),
                 *(glob.glob(f"/dev/shm/gpt_recipes_stopped_{addr}_{port}") if marks else [])]:
        try:
            os.unlink(path)
        except OSError:
            pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def device(device_type: str, env: DistEnv) -> torch.device:
    """This rank's device (before an engine exists to say so)."""
    return torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device(device_type)


def rank_max(value: float, device: torch.device | str) -> float:
    """The largest of one number over all ranks (on the engine's device: NCCL reduces no CPU tensors)."""
    return all_reduce(torch.tensor(float(value), dtype=torch.float64, device=device), dist.ReduceOp.MAX).item()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object; the others' values are ignored)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
