"""Which launcher started a rank and where the rank sits, from each launcher's own variables."""

import pytest

from gpt_recipes.errors import UserError
from gpt_recipes.parallel.launchers import detect, hostnames, tasks_per_node

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}


def test_torch_variables_come_first():
    found = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", **SRUN})
    assert (found.rank, found.local_rank, found.world, found.local_world, found.nodes) == (3, 1, 4, 2, 2)
    assert found.master_addr is None and "MASTER_ADDR" not in found.exports()  # the launcher set them
    assert detect({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"


def test_srun_tasks():
    found = detect(SRUN)
    assert found.launcher == "Slurm (srun)"
    assert (found.rank, found.local_rank, found.world, found.local_world, found.nodes) == (5, 1, 8, 4, 2)
    assert (found.master_addr, found.master_port) == ("gpu07", str(20000 + 4242))
    assert found.exports() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                               "MASTER_ADDR": "gpu07", "MASTER_PORT": "24242"}
    assert detect({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "6000"}).exports()["MASTER_ADDR"] == "head"
    assert "2 rank(s)" not in found.describe() and "4 per node; rendezvous gpu07:24242" in found.describe()


def test_the_batch_shell_is_not_a_rank():
    """sbatch's shell has SLURM_PROCID and SLURM_NTASKS but no job step: a `python` run there is one process."""
    batch = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_ID",)}
    assert detect(batch).world == 1


def test_mpi_launchers():
    ompi = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                   "OMPI_COMM_WORLD_LOCAL_SIZE": "2", **SRUN})  # mpirun inside an allocation is mpirun's
    assert (ompi.launcher, ompi.rank, ompi.world, ompi.master_addr) == ("Open MPI (mpirun)", 1, 2, "127.0.0.1")
    hydra = detect({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "node0", "MASTER_PORT": "7000"})
    assert (hydra.rank, hydra.local_rank, hydra.world, hydra.local_world, hydra.nodes) == (3, 1, 4, 2, 2)
    assert hydra.exports()["MASTER_ADDR"] == "node0"
    assert detect({}).world == 1


@pytest.mark.parametrize("spec, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
    ("a1,b[8-10]", ["a1", "b8", "b9", "b10"]),
])
def test_slurm_host_lists(spec, hosts):
    assert hostnames(spec) == hosts


def test_slurm_task_counts():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(UserError, match="not in the form"):
        tasks_per_node("two")
    with pytest.raises(UserError, match="SLURM_PROCID='x'"):
        detect({**SRUN, "SLURM_PROCID": "x"})


@pytest.mark.parametrize("environ", [
    {"RANK": "3", "WORLD_SIZE": "4", **SRUN},
    SRUN,
    {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"},
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
    {"PMI_RANK": "2", "PMI_SIZE": "4"},
    {},
])
def test_one_line_errors_come_from_the_rank_the_launcher_names(monkeypatch, environ):
    """errors.py (below the launchers in the import order) reads the same rank as detect()."""
    from gpt_recipes import errors

    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", *SRUN):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert errors._rank() == detect(environ).rank
