"""Next-token prediction, the objective of pretraining and fine-tuning: the mean cross-entropy over
every target token of the global batch (all tokens of a pretraining window; a fine-tuning
example's response tokens)."""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch

from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable
from gpt_recipes.parallel.layout import EVERY_LAYOUT, Supports
from gpt_recipes.train import router_balance
from gpt_recipes.train.objective import Objective, StepResult, StepSetup, TrainStep
from gpt_recipes.train.step import DataParallelStep


class NextToken(Objective):
    name = "next_token"
    title = "next-token prediction"

    def __init__(self, fused_loss: bool = True, one_length: bool = True, router_aux_loss_coef: float | None = None):
        """fused_loss: the output layer and loss fused where the model allows (--fused_loss).
        one_length: every sample has one length (pretraining windows), as a pipeline needs.
        router_aux_loss_coef: an MoE model's load-balancing loss weight (None: its config's)."""
        self.fused_loss, self.router_aux_loss_coef = fused_loss, router_aux_loss_coef
        self.supports = EVERY_LAYOUT if one_length else Supports(
            sequence=True, tensor=True, experts=True,
            why_not="fine-tuning batches vary in length, and the pipeline engine needs one shape for every micro-batch")

    def line_text(self, record: dict[str, Any]) -> str:
        return router_balance.line_text(record)

    def make_step(self, setup: StepSetup) -> tuple[TrainStep, dict[str, Any]]:
        run = setup.run
        if run.layout.pipeline > 1:  # the pipeline engine takes the loss on its last stage
            return PipelineStep(setup.batches, run.batch, run.env.rank), {"fused_loss": False}
        loss_fn = self.loss(setup)
        return DataParallelStep(setup.batches, run.batch, run.env, loss_fn), {"fused_loss": loss_fn.fused}

    def loss(self, setup: StepSetup):
        """The training loss, fused with the output layer unless asked not to or it cannot be; says which."""
        model, run = setup.engine.module, setup.run
        why_not = fused_unavailable(model, setup.stage) if self.fused_loss else "--no-fused_loss"
        if why_not is None and run.layout.tensor > 1:
            why_not = "tensor parallelism: DeepSpeed's AutoTP owns the output layer"
        loss_fn = CausalLMLoss(model, fused=why_not is None)
        run.say("Loss: output layer and cross-entropy fused, in chunks of rows (the logits are never held whole)"
                if loss_fn.fused else f"Loss: cross-entropy over the model's logits ({why_not})")
        return router_balance.balanced(loss_fn, model, self.router_aux_loss_coef, run.say)


class PipelineStep:
    """The loop's step for a pipeline: engine.train_batch over this data-parallel rank's micro-batches
    of the global batch, and evaluation through engine.eval_batch. Pretraining windows have one
    length, so the mean of the micro-batches' mean losses is the global batch's mean token loss."""

    probes_memory = False  # activations live on several stages at once; plan_memory.py sizes them

    def __init__(self, batches, plan: BatchPlan, rank: int):
        self.batches, self.plan, self.data_rank = batches, plan, plan.data_rank(rank)

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        return {}

    def _micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for micro_step in range(self.plan.grad_accum):
            idx = self.batches.order.micro_batch(step, self.data_rank, micro_step)
            inputs, targets = self.batches.train.batch(idx)
            yield inputs["input_ids"], targets

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe, window) -> StepResult:
        loss = engine.train_batch(self._micro_batches(step))  # the global batch's mean, on every rank
        # The loop sums this over every rank (P stages x D pipelines) and divides by accumulation x D.
        return StepResult(loss.detach() * self.plan.grad_accum / self.plan.layout.pipeline,
                          self.batches.train.num_tokens(global_batch))

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, Any]:
        """val_loss and val_ppl over the validation windows, and each source's loss for a mixture.
        eval_batch averages each micro-batch's mean loss over the data-parallel pipelines (whose
        micro-batches have equal sizes and come from one source) and hands it to every stage."""
        val, shape = self.batches.val, None
        sums = np.zeros((max(1, len(val.source_names)), 2))
        for idx in self.batches.val_micro_batches:
            inputs, targets = val.batch(idx)
            if inputs["input_ids"].shape != shape:  # the stages exchange shapes once per shape
                engine.reset_activation_shape()
                shape = inputs["input_ids"].shape
            loss = engine.eval_batch(iter([(inputs["input_ids"], targets)]), num_micro_batches=1)
            sums[val.source_of(idx[0])] += (float(loss) * len(idx), len(idx))
        engine.reset_activation_shape()
        engine.train()
        overall = sums[:, 0].sum() / sums[:, 1].sum()
        result = {"val_loss": overall, "val_ppl": math.exp(min(overall, 50.0))}
        if len(val.source_names) > 1:
            result["val_loss_by_source"] = {name: s / n for name, (s, n) in zip(val.source_names, sums)}
        return result
