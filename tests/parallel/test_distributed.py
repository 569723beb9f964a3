"""Launchers: torchrun, deepspeed, accelerate launch and a simulated two-node run train identically."""

import json
import os

import pytest

from gpt_recipes.parallel.distributed import environment
from tests.helpers import PARITY_STEPS, launch_two_nodes, parity_args, parity_run, read_metrics

def _losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out)[0]]


@pytest.fixture(scope="module")
def reference(cross_stage):
    """Per-step losses of the 2-rank ZeRO-2 parity run (fp32, clipping 1.0) under torchrun, which
    tests/recipes/test_pretrain.py compares with every other layout."""
    out = cross_stage[1]["zero2 2x2"]
    return out, _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_launchers_match_torchrun(tmp_path, tiny_data, tiny_model, reference, launcher):
    _, expected = reference
    out = parity_run(tmp_path, tiny_data, tiny_model, 2, 2, 2, 1, True, launcher, launcher=launcher)
    assert len(expected) == PARITY_STEPS
    assert _losses(out) == pytest.approx(expected, abs=1e-6)


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
