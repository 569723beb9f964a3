"""Which launcher started this process, and where it sits among the ranks.

torchrun, the deepspeed launcher and `accelerate launch` export torch's variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Schedulers and MPI launchers start one
process per rank with variables of their own: Slurm's `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST), Open MPI's `mpirun`
(OMPI_COMM_WORLD_*) and the PMI launchers of MPICH and Intel MPI (PMI_RANK, PMI_SIZE,
MPI_LOCALRANKID). `detect` reads whichever is there, in that order (a torchrun started by srun
is torchrun's), and `Launch.exports` gives torch's variables for the process group.

Under Slurm the rendezvous is the first host of the job step's node list, on a port derived from
the job id (MASTER_ADDR and MASTER_PORT, when set, win). MPI launchers name no rendezvous: on
one host it is 127.0.0.1; across hosts pass MASTER_ADDR (mpirun -x MASTER_ADDR=host0).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from gpt_recipes.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    launcher: str  # as messages name it
    rank: int
    local_rank: int
    world: int
    local_world: int
    master_addr: str | None = None  # None: the launcher set it (or a world of one needs none)
    master_port: str | None = None
    nodes: int = 1

    def exports(self) -> dict[str, str]:
        """torch's variables for this rank, as the launcher's own give them."""
        out = {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world),
               "LOCAL_WORLD_SIZE": str(self.local_world)}
        if self.master_addr is not None:
            out.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        return out

    def describe(self) -> str:
        per_node = f"{self.local_world} per node" if self.nodes > 1 else "on one node"
        where = f"; rendezvous {self.master_addr}:{self.master_port}" if self.master_addr else ""
        return f"Launcher: {self.launcher}, {self.world} rank(s) {per_node}{where}"


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise UserError(f"the launcher set {key}={environ[key]!r}, which is not a whole number")


def detect(environ: Mapping[str, str] = os.environ) -> Launch:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE")
        # torchrun exports LOCAL_WORLD_SIZE; the deepspeed launcher exports LOCAL_SIZE.
        local_world = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world)))
        name = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "RANK/WORLD_SIZE (deepspeed, torchrun or accelerate)"
        return Launch(name, _int(environ, "RANK"), int(environ.get("LOCAL_RANK", "0")), world, local_world,
                      nodes=max(1, world // max(1, local_world)))
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _mpi(environ, "Open MPI (mpirun)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in environ:
        return _mpi(environ, "MPI (PMI: MPICH or Intel MPI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                    "MPI_LOCALNRANKS")
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:  # a task of srun (the batch shell has no step)
        return _slurm(environ)
    return Launch("none (one process)", 0, 0, 1, 1)


def _mpi(environ: Mapping[str, str], name: str, rank: str, size: str, local_rank: str, local_size: str) -> Launch:
    world = _int(environ, size)
    local_world = int(environ.get(local_size, world))
    return Launch(name, _int(environ, rank), int(environ.get(local_rank, "0")), world, local_world,
                  environ.get("MASTER_ADDR", "127.0.0.1"), environ.get("MASTER_PORT", str(DEFAULT_PORT)),
                  max(1, world // max(1, local_world)))


def _slurm(environ: Mapping[str, str]) -> Launch:
    world = _int(environ, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in environ else _int(environ, "SLURM_NTASKS")
    per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
                              or str(world))
    node = int(environ.get("SLURM_NODEID", "0"))
    hosts = hostnames(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1")
    port = environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return Launch("Slurm (srun)", _int(environ, "SLURM_PROCID"), int(environ.get("SLURM_LOCALID", "0")), world,
                  per_node[min(node, len(per_node) - 1)], environ.get("MASTER_ADDR", hosts[0]), port, len(per_node))


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed task counts, "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"Slurm's tasks per node {spec!r} is not in the form 2(x3),1")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def hostnames(nodelist: str) -> list[str]:
    """Slurm's compressed host list, "gpu[01-03,07],login" -> gpu01 gpu02 gpu03 gpu07 login (as
    `scontrol show hostnames` expands it)."""
    hosts = []
    for prefix, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for n in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{n:0{len(first)}d}")
    return hosts
