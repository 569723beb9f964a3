"""Collectives through DeepSpeed's shared-memory kernel: gloo's results, and the same training."""

import json

import pytest

from gpt_recipes.parallel.shm_comm import unavailable
from tests.helpers import ds_json, launch, pretrain_args, read_metrics


def test_where_the_shared_memory_route_applies():
    assert unavailable("cpu", 2, 2) is None
    assert "one rank" in unavailable("cpu", 1, 1)
    assert "more than one machine" in unavailable("cpu", 2, 1)
    assert "cuda" in unavailable("cuda", 2, 2)


@pytest.mark.slow
def test_collectives_equal_gloos():
    """All-reduce (fp32 past the kernel's chunk size, bf16), all-gather (ZeRO's in-place layout
    too, and ZeRO-3's asynchronous call) and reduce-scatter (ZeRO's output inside the input too)
    equal gloo's bit for bit; MAX, float64 and groups other than the world go to gloo, so two
    groups' collectives issued in another order on each rank still pair up."""
    proc = launch("tests/scripts/shm_collectives.py", [], ranks=2)
    assert proc.stdout.count("ok ") == 2 * 13, proc.stdout[-3000:]


@pytest.mark.slow
def test_the_kernel_carries_the_group_each_zero_stage_uses():
    """ZeRO-1/2 reduce over DeepSpeed's copy of the world group, ZeRO-3 over the group its weights
    are partitioned over: once the engine starts, every fp32 sum of its steps takes the kernel."""
    proc = launch("tests/scripts/shm_engine_group.py", [], ranks=2)
    assert proc.stdout.count("all through the kernel") == 2 * 3, proc.stdout[-3000:]


@pytest.mark.slow
def test_bf16_training_is_identical_over_gloo(tmp_path, tiny_data, tiny_model):
    """With 2 ranks each sum has two terms, which any order adds alike: the runs must agree exactly.
    At ZeRO-3, which gathers parameters, reduce-scatters gradients and all-reduces norms and losses
    (ZeRO-0/1/2's all-reduces match gloo's in the fp32 parity runs, which take this route, against
    the two-node run in test_distributed.py, which cannot)."""
    stage = 3
    cfg = ds_json(tmp_path, stage, micro=2)  # the shipped bf16 JSON, clipping on
    runs = {}
    for label, extra in (("shm", []), ("gloo", ["--no-shm_comm"])):
        out = tmp_path / label
        proc = launch("recipes/pretrain.py", pretrain_args(cfg, tiny_data, tiny_model, out, 6, "--log_interval", "1",
                                                           "--eval_interval", "0", *extra))
        assert ("Collectives: all-reduce, all-gather and reduce-scatter of the engine's data-parallel group through "
                "DeepSpeed's shared-memory kernel; other groups through gloo" if label == "shm"
                else "Collectives: gloo (--no-shm_comm)") in proc.stdout
        assert json.loads((out / "config.json").read_text())["shm_comm"] is (label == "shm")
        runs[label] = [(r["loss"], r["grad_norm"]) for r in read_metrics(out)[0]]
    assert len(runs["shm"]) == 6
    assert runs["shm"] == runs["gloo"]
