"""What the recipe changes on DeepSpeed's engine once it exists: fewer per-step costs, the
same arithmetic. Each change is one DeepSpeed does not offer as a setting; each keeps what
the step computes, and tests/recipes/test_pretrain.py's stage parity checks it does.
"""

from __future__ import annotations

from typing import Any

import torch

from gpt_recipes import ds_config
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError


def lighten_step(engine, world_size: int, stage: int) -> None:
    if world_size == 1 and stage == 0:
        # Nothing to average over one rank, but DeepSpeed would still flatten every gradient
        # into buckets, "all-reduce" them and copy them back after each backward.
        engine.enable_backward_allreduce = False
    keep_clip_norm(engine)
    skip_bf16_overflow_scan(engine)


def keep_clip_norm(engine) -> None:
    """Log the gradient norm at ZeRO-0 in fp32 too, so every stage's norms compare step by step.

    Without a ZeRO or mixed-precision optimizer DeepSpeed clips with
    deepspeed.runtime.utils.clip_grad_norm_, which returns the global norm, and drops it:
    get_global_grad_norm() stays None. This clips the same way and keeps what it returns.
    Without model parallelism it takes torch's clip_grad_norm_: the gradients are already
    averaged over the ranks, so DeepSpeed's extra all-reduce of the norm (for expert layers,
    which these models lack) and its norm and clip coefficient built from host values each
    step (two host-to-device copies that wait for a GPU) buy nothing.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep() -> None:
        if engine.mpu is None:
            engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(),
                                                                      engine.gradient_clipping(), foreach=True)
        else:
            engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                       max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep


def skip_bf16_overflow_scan(engine) -> None:
    """At ZeRO-0 in bf16, DeepSpeed's mixed-precision optimizer (its fp16 one, run in bf16) first
    tests every parameter's gradient for inf and NaN, one host-device wait per parameter (148
    waits a step for GPT-2 124M). The test serves fp16's loss scaling; bf16 has fp32's range. The
    same optimizer then takes the global gradient norm and skips the step if it is not finite,
    which catches every inf or NaN the scan would have."""
    checker = getattr(engine.optimizer, "overflow_checker", None)
    if checker is not None and engine.bfloat16_enabled() and not engine.zero_optimization():
        checker.has_overflow = lambda params, has_moe_params=None: False


def replay_adam_step_products(engine) -> None:
    """After a resume, put DeepSpeed's CPU Adam kernels where an unbroken run's would be.

    Those kernels (the CPU FusedAdam, and DeepSpeedCPUAdam for optimizer offload) keep beta1**t
    and beta2**t in C++ state, multiplied by beta once per step, in float32; a resumed process
    starts them with pow(beta, t) instead, which differs from the product in the last bit at
    some steps (for beta2 = 0.95, from t = 6), and every update after that differs by an ulp.
    Calling the kernel once per past step on empty tensors redoes the products and touches no
    weight. GPU FusedAdam computes pow(beta, t) at every step and needs nothing."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    base = engine.optimizer
    while base is not None and not isinstance(base, (FusedAdam, DeepSpeedCPUAdam)):
        base = getattr(base, "optimizer", None)
    if base is None or (isinstance(base, FusedAdam) and engine.device.type != "cpu"):
        return
    steps = [int(base.state[p]["step"]) for g in base.param_groups for p in g["params"] if "step" in base.state[p]]
    if not steps:
        return
    empty = torch.empty(0, dtype=torch.float32)
    for step in range(1, max(steps) + 1):
        for group in base.param_groups:
            beta1, beta2 = group["betas"]
            if isinstance(base, FusedAdam):
                base.multi_tensor_adam(2048 * 32, base._dummy_overflow_buf, [[empty]] * 4, group["lr"], beta1,
                                       beta2, group["eps"], step, base.adam_w_mode, int(group["bias_correction"]),
                                       group["weight_decay"])
            else:
                base.ds_opt_adam.adam_update(base.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                             group["weight_decay"], group["bias_correction"], empty, empty, empty,
                                             empty)


def planned_settings(cfg: dict[str, Any], batch: BatchPlan) -> dict[str, Any]:
    """What the run printed and records about its engine, from the resolved JSON."""
    zero = cfg.get("zero_optimization") or {}
    return {"ZeRO stage": ds_config.zero_stage(cfg), "precision": ds_config.precision(cfg),
            "optimizer offload": (zero.get("offload_optimizer") or {}).get("device", "none"),
            "parameter offload": (zero.get("offload_param") or {}).get("device", "none"),
            "micro-batch": batch.micro_batch, "accumulation steps": batch.grad_accum}


def engine_settings(engine) -> dict[str, Any]:
    """The same facts, as DeepSpeed's engine runs them."""
    def device(offload) -> str:
        return str(getattr(getattr(offload, "device", None), "value", getattr(offload, "device", "none")) or "none")

    return {"ZeRO stage": int(engine.zero_optimization_stage()),
            "precision": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
            "optimizer offload": device(engine.zero_offload_optimizer()),
            "parameter offload": device(engine.zero_offload_param()),
            "micro-batch": engine.train_micro_batch_size_per_gpu(),
            "accumulation steps": engine.gradient_accumulation_steps()}


def check_runs_as_planned(engine, cfg: dict[str, Any], batch: BatchPlan) -> None:
    """Stop if DeepSpeed runs another stage, precision, offload or batch than the run printed and
    records: the JSON must mean to DeepSpeed what it means to the recipe."""
    planned, running = planned_settings(cfg, batch), engine_settings(engine)
    differ = [f"{key} {running[key]} (planned {planned[key]})" for key in planned if running[key] != planned[key]]
    if differ:
        raise UserError("DeepSpeed runs " + ", ".join(differ) + " from this DeepSpeed config; please report this "
                        "with the JSON: the run stopped rather than record what it does not do")
