"""Launchers: torchrun, deepspeed, accelerate launch, a simulated two-node run, a real one-host Slurm
(sbatch of the shipped batch script, its warning signal, requeue and resume), Open MPI's mpirun and
torchrun's elastic restart train identically."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_recipes.launch import master_port, unbuffered_env
from gpt_recipes.parallel.distributed import environment
from tests import slurm_cluster
from tests.helpers import (PARITY_STEPS, REPO, launch_two_nodes, parity_args, parity_run, read_metrics,
                           run_here)

def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out)[0]]


@pytest.fixture(scope="module")
def reference(cross_stage):
    """Per-step losses of the 2-rank ZeRO-2 parity run (fp32, clipping 1.0), its ranks started directly
    with torch's variables (tests/helpers.py launch), which tests/recipes/test_pretrain.py compares with
    every other layout."""
    out = cross_stage[1]["zero2 2x2"]
    return out, _losses(out)


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, tiny_data, tiny_model):
    """The parity run under `deepspeed --num_gpus 2`, which the cluster launchers are compared with."""
    tmp = tmp_path_factory.mktemp("deepspeed_launcher")
    return parity_run(tmp, tiny_data, tiny_model, 2, 2, 2, 1, True, "deepspeed", launcher="deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "accelerate"])
def test_launchers_match_ranks_started_directly(tmp_path, tiny_data, tiny_model, reference, deepspeed_run, launcher):
    _, expected = reference
    out = deepspeed_run if launcher == "deepspeed" else parity_run(tmp_path, tiny_data, tiny_model, 2, 2, 2, 1, True,
                                                                   launcher, launcher=launcher)
    assert len(expected) == PARITY_STEPS
    assert _losses(out) == pytest.approx(expected, abs=1e-6)


def _final_weights(out):
    from gpt_recipes.checkpoints.consolidate import consolidated_state_dict

    return consolidated_state_dict(out / "checkpoints", f"step{PARITY_STEPS}")


def _same_weights(a, b) -> float:
    first, second = _final_weights(a), _final_weights(b)
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(f"no one-host Slurm here: {why}")
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def _submit(slurm, tmp_path, args: list[str], **env: str) -> tuple[str, Path]:
    log = tmp_path / "job.out"
    job = slurm.submit(str(REPO / "launch" / "slurm" / "pretrain.sbatch"), args, REPO, log,
                       env=unbuffered_env(PYTHON=sys.executable, **env))
    return job, log


@pytest.mark.slow
def test_the_slurm_batch_script_trains_as_the_deepspeed_launcher_does(tmp_path, tiny_data, tiny_model, slurm,
                                                                      deepspeed_run):
    """sbatch of launch/slurm/pretrain.sbatch on a real one-host Slurm: srun starts 2 tasks, each reads its rank
    from Slurm's variables; the losses are the deepspeed launcher's, and the export verifies."""
    out = tmp_path / "slurm"
    job, log = _submit(slurm, tmp_path, parity_args(tmp_path, tiny_data, tiny_model, 2, 2, 1, True, out,
                                                    "--export_hf", str(tmp_path / "hf")))
    assert slurm.wait(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "Launcher: Slurm (srun), 2 rank(s) on one node; rendezvous" in text
    assert "--resume: nothing to resume" in text and "greedy tokens identical" in text
    assert _losses(out) == pytest.approx(_losses(deepspeed_run), abs=1e-6)


@pytest.mark.slow
def test_slurms_warning_checkpoints_requeues_and_resumes_to_the_same_weights(tmp_path, tiny_data, tiny_model, slurm,
                                                                               deepspeed_run):
    """`scancel --signal=USR1` (what --signal=USR1@120 sends before a time limit) during the run: the ranks
    save and stop with 138, the script requeues the job, the requeued job resumes by itself and ends
    with the unbroken run's weights; submitted again, the finished run says so and exits 0."""
    out = tmp_path / "preempted"
    args = parity_args(tmp_path, tiny_data, tiny_model, 2, 2, 1, True, out)
    job, log = _submit(slurm, tmp_path, args, GPT_RECIPES_FAULT="hold@3")  # step 3 takes 4 s
    deadline = time.monotonic() + 120
    while not any(line["step"] >= 2 for line in _lines(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job)
    assert slurm.wait(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped: SIGUSR1 received: saved a checkpoint at step" in text and "requeueing" in text, text[-3000:]
    assert slurm.restarts(job) == 1 and "Resumed from step" in text
    assert _same_weights(out, deepspeed_run) <= 1e-6
    again = run_here("recipes/pretrain.py", [*args, "--resume"])
    assert again.returncode == 0 and "holds a finished run" in again.stderr, again.stderr[-2000:]


def _lines(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["mpirun", "deepspeed --launcher openmpi"])
def test_mpirun_trains_as_the_deepspeed_launcher_does(tmp_path, tiny_data, tiny_model, deepspeed_run, how):
    """Open MPI starts the ranks (mpirun itself, or the deepspeed launcher's openmpi mode, which runs mpirun
    for a hostfile; --force_multi makes it do so for this one host); each reads OMPI_COMM_WORLD_*."""
    if not shutil.which("mpirun"):
        pytest.skip("mpirun not installed here (apt-get install openmpi-bin; .ci/run installs it)")
    out = tmp_path / "mpirun"
    args = parity_args(tmp_path, tiny_data, tiny_model, 2, 2, 1, True, out)
    with master_port() as port:
        env = unbuffered_env(MASTER_PORT=str(port))
        if how == "mpirun":
            passed = [flag for key in ("MASTER_PORT", "PATH", "PYTHONUNBUFFERED", "DS_ACCELERATOR", "HF_HUB_OFFLINE")
                      if key in env for flag in ("-x", key)]
            start = ["mpirun", "-np", "2", "--allow-run-as-root", *passed, sys.executable]
        else:
            (tmp_path / "hostfile").write_text("localhost slots=2\n")
            start = [sys.executable, "-m", "deepspeed.launcher.runner", "--launcher", "openmpi", "--hostfile",
                     str(tmp_path / "hostfile"), "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1",
                     "--launcher_args=--allow-run-as-root"]
        proc = subprocess.run([*start, "recipes/pretrain.py", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Launcher: Open MPI (mpirun), 2 rank(s) on one node" in proc.stdout
    assert _losses(out) == pytest.approx(_losses(deepspeed_run), abs=1e-6)


@pytest.mark.slow
def test_torchrun_restarts_a_group_that_lost_a_rank_and_it_resumes_by_itself(tmp_path, tiny_data, tiny_model,
                                                                             reference):
    """Rank 1 dies (SIGKILL) after step 7; torchrun --max_restarts 1 restarts both ranks, and --resume
    continues from the step-5 checkpoint to the unbroken run's final weights."""
    out = tmp_path / "elastic"
    args = parity_args(tmp_path, tiny_data, tiny_model, 2, 2, 1, True, out, "--save_interval", "5", "--resume")
    with master_port() as port:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--max_restarts", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "recipes/pretrain.py", *args], cwd=REPO, env=unbuffered_env(GPT_RECIPES_FAULT="die@7:1"),
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Resumed from step 5" in proc.stdout
    assert _same_weights(out, reference[0]) <= 1e-6


@pytest.mark.slow
def test_two_nodes_match_one_node(tmp_path, tiny_data, tiny_model, reference):
    """Two launcher invocations (--node_rank 0/1, master on 127.0.0.1) == one node with 2 ranks."""
    _, expected = reference
    out = tmp_path / "two_nodes"
    launch_two_nodes("recipes/pretrain.py", parity_args(tmp_path, tiny_data, tiny_model, 2, 2, 1, True, out), tmp_path)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert _losses(out) == pytest.approx(expected, abs=1e-6)


def test_environment_reads_each_launchers_variables(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert environment().world_size == 1 and environment().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name
    env = environment()
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's name
    monkeypatch.delenv("LOCAL_SIZE")
    assert environment().local_world_size == 2


@pytest.mark.parametrize("given, plain", [
    ("9.0a", "9.0"),  # what CUDA images set on Hopper; DeepSpeed 0.19 failed on '0a' building FusedAdam
    ("8.0;9.0a;10.0f+PTX", "8.0;9.0;10.0+PTX"),
    ("7.5 8.6+PTX", "7.5;8.6+PTX"),
    ("9.0 9.0a", "9.0"),
])
def test_cuda_arch_list_that_deepspeed_parses(monkeypatch, given, plain):
    from gpt_recipes.parallel.distributed import plain_cuda_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    plain_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == plain


def test_the_first_launch_says_it_builds_the_shared_memory_op(monkeypatch, tmp_path, capsys):
    from gpt_recipes.parallel.distributed import DistEnv, _say_if_building_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    _say_if_building_ops(env)
    assert "Building DeepSpeed's shared-memory op" in capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)  # the lookup itself may create it
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    _say_if_building_ops(env)
    assert capsys.readouterr().out == ""
