"""The engine as DeepSpeed built it against the run as planned and printed."""

import copy
from types import SimpleNamespace

import pytest

from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError
from gpt_recipes.train.engine_setup import check_runs_as_planned, replay_adam_step_products


def _engine(stage=2, bf16=True, fp16=False, offload="none", micro=2, accum=1):
    return SimpleNamespace(zero_optimization_stage=lambda: stage, bfloat16_enabled=lambda: bf16,
                           fp16_enabled=lambda: fp16,
                           zero_offload_optimizer=lambda: None if offload == "none" else SimpleNamespace(device=offload),
                           zero_offload_param=lambda: None, train_micro_batch_size_per_gpu=lambda: micro,
                           gradient_accumulation_steps=lambda: accum)


CFG = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
PLAN = BatchPlan(micro_batch=2, grad_accum=1, world_size=2)


def test_an_engine_that_runs_the_plan_passes():
    check_runs_as_planned(_engine(), CFG, PLAN)
    check_runs_as_planned(_engine(offload="cpu"), {**CFG, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}, PLAN)


@pytest.mark.parametrize("engine, said", [
    (_engine(stage=1), "ZeRO stage 1 \\(planned 2\\)"),
    (_engine(bf16=False), "precision fp32 \\(planned bf16\\)"),
    (_engine(offload="cpu"), "optimizer offload cpu \\(planned none\\)"),
    (_engine(micro=4, accum=2), "micro-batch 4 \\(planned 2\\), accumulation steps 2 \\(planned 1\\)"),
])
def test_any_difference_stops_the_run(engine, said):
    with pytest.raises(UserError, match="DeepSpeed runs " + said):
        check_runs_as_planned(engine, CFG, PLAN)


@pytest.mark.parametrize("kind", ["FusedAdam", "DeepSpeedCPUAdam"])
def test_a_resumed_cpu_adam_steps_as_an_unbroken_one_bit_for_bit(kind):
    """DeepSpeed's CPU Adam kernels keep beta**t as running products; after a resume the replay
    puts them back, so steps 6-9 (where beta2 = 0.95's product first leaves pow) match exactly."""
    import torch
    from deepspeed.ops import adam

    def optimizer(param):
        return getattr(adam, kind)([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    grads = [torch.randn(64, generator=torch.Generator().manual_seed(step)) for step in range(9)]

    def steps(opt, param, first, last):
        for step in range(first, last):
            param.grad = grads[step].clone()
            opt.step()
        return param.detach().clone()

    param = torch.nn.Parameter(torch.ones(64))
    unbroken_opt = optimizer(param)
    at_five = steps(unbroken_opt, param, 0, 5)
    saved = copy.deepcopy(unbroken_opt.state_dict())
    unbroken = steps(unbroken_opt, param, 5, 9)

    def resumed(replay):
        resumed_param = torch.nn.Parameter(at_five.clone())
        opt = optimizer(resumed_param)
        opt.load_state_dict(saved)
        if replay:
            replay_adam_step_products(SimpleNamespace(optimizer=opt, device=torch.device("cpu")))
        return steps(opt, resumed_param, 5, 9)

    assert torch.equal(resumed(replay=True), unbroken)
    assert not torch.equal(resumed(replay=False), unbroken)  # what the replay is for
