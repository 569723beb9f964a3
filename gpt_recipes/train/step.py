"""The step of a data-parallel run with a loss part (any ZeRO stage, sequence or tensor parallel):
forward, engine.backward and engine.step for each of this rank's micro-batches, and a validation
pass. Next-token prediction, DPO and KTO differ only in the loss they hand it."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Protocol

import numpy as np
import torch

from gpt_recipes import faults
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.metrics.memory import MemoryProbe
from gpt_recipes.metrics.throughput import ThroughputWindow
from gpt_recipes.parallel.distributed import DistEnv, all_reduce
from gpt_recipes.train.objective import StepResult


class Loss(Protocol):
    """A training loss over a micro-batch, called with the engine (so its hooks run), the inputs and
    the next-token targets; its sum over a global batch divided by num_targets is the step's loss."""

    perplexity: bool  # its mean is per token, so exp(mean) is a perplexity

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor: ...

    def for_evaluation(self) -> "Loss":
        """The loss to evaluate with (its own figures, apart from training's)."""

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """Its own figures since the last call, over all ranks (a collective), or {}."""


def to_device(batch: tuple[dict[str, torch.Tensor], torch.Tensor], device: torch.device):
    inputs, targets = batch
    if device.type == "cpu":
        return inputs, targets
    move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return {k: move(v) for k, v in inputs.items()}, move(targets)


class DataParallelStep:
    """One optimizer step over this rank's micro-batches with `loss_fn`, and its validation pass."""

    probes_memory = True

    def __init__(self, batches, plan: BatchPlan, env: DistEnv, loss_fn: Loss):
        self.batches, self.plan, self.env, self.loss_fn = batches, plan, env, loss_fn

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        return self.loss_fn.take_metrics(prefix)

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe: MemoryProbe | None,
                 window: ThroughputWindow) -> StepResult:
        """The step's loss is the mean over every target of the global batch, however the batch is
        split into ranks and micro-batches (fine-tuning examples differ in length): each micro-batch's
        summed loss is scaled so that DeepSpeed's averaging over ranks and accumulation steps yields it
        (a sequence-parallel rank's loss covers its part of each sample). With a probe, the first
        micro-batch's activations and the model states before the update are measured."""
        batches, plan = self.batches, self.plan
        scale = plan.grad_accum * plan.grad_divisor / max(1, batches.train.num_targets(global_batch))
        total = torch.zeros((), device=engine.device)
        for micro_step in range(plan.grad_accum):
            idx = batches.order.micro_batch(step, plan.data_rank(self.env.rank), micro_step)
            inputs, targets = to_device(batches.train.batch(idx), engine.device)
            with probe.saved_activations() if probe and micro_step == 0 else contextlib.nullcontext():
                loss = self.loss_fn(engine, inputs, targets, reduction="sum") * scale
            loss = faults.poison_loss(loss, step + 1, self.env.rank)
            engine.backward(loss)
            if probe and micro_step == 0:
                probe.finish_activations()
            if probe and micro_step == plan.grad_accum - 1:
                with window.paused():  # keep the reading out of throughput
                    probe.read_model_states()
            engine.step()
            total += loss.detach()
        return StepResult(total, batches.train.num_tokens(global_batch))

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, Any]:
        """Over all ranks' validation samples: val_loss, the mean loss per target (a token, a pair, a
        row), val_ppl where that is per token, each source's loss for a mixture, and the loss's own
        figures prefixed val_."""
        val = self.batches.val
        engine.eval()
        loss_fn = self.loss_fn.for_evaluation()
        sources = max(1, len(val.source_names))  # a mixture's sources, each evaluated on its own
        total = torch.zeros(sources, 2, dtype=torch.float64, device=engine.device)
        for idx in self.batches.val_micro_batches:
            inputs, targets = to_device(val.batch(idx), engine.device)
            k = val.source_of(idx[0])
            total[k, 0] += loss_fn(engine, inputs, targets, reduction="sum").double()
            total[k, 1] += val.num_targets(idx)
        engine.train()
        all_reduce(total)
        extra = loss_fn.take_metrics("val_")
        overall = (total[:, 0].sum() / total[:, 1].sum()).item()
        result: dict[str, Any] = {"val_loss": overall}
        if loss_fn.perplexity:
            result["val_ppl"] = math.exp(min(overall, 50.0))
        if sources > 1:
            result["val_loss_by_source"] = {name: (t[0] / t[1]).item() for name, t in zip(val.source_names, total)}
        return {**result, **extra}
