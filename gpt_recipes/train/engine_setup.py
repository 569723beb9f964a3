"""What the recipe changes on DeepSpeed's engine once it exists: fewer per-step costs, the
same arithmetic. Each change is one DeepSpeed does not offer as a setting; each keeps what
the step computes, and tests/recipes/test_pretrain.py's stage parity checks it does.
"""

from __future__ import annotations

import torch


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
