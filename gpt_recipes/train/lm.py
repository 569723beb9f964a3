"""Next-token prediction, the objective of pretraining and fine-tuning: the mean cross-entropy over
every target token of the global batch (all tokens of a pretraining window; a fine-tuning
example's response tokens)."""

from __future__ import annotations

from typing import Any

from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable
from gpt_recipes.parallel import pipeline
from gpt_recipes.parallel.layout import EVERY_LAYOUT, Supports
from gpt_recipes.train.objective import Objective, StepSetup, TrainStep
from gpt_recipes.train.step import DataParallelStep


class NextToken(Objective):
    name = "next_token"
    title = "next-token prediction"

    def __init__(self, fused_loss: bool = True, one_length: bool = True):
        """fused_loss: the output layer and loss fused where the model allows (--fused_loss).
        one_length: every sample has one length (pretraining windows), as a pipeline needs."""
        self.fused_loss = fused_loss
        self.supports = EVERY_LAYOUT if one_length else Supports(
            sequence=True, tensor=True, why_not="fine-tuning batches vary in length, and the pipeline engine needs "
                                               "one shape for every micro-batch")

    def make_step(self, setup: StepSetup) -> tuple[TrainStep, dict[str, Any]]:
        run = setup.run
        if run.layout.pipeline > 1:  # the pipeline engine takes the loss on its last stage
            return pipeline.PipelineStep(setup.batches, run.batch, run.env.rank), {"fused_loss": False}
        loss_fn = self.loss(setup)
        return DataParallelStep(setup.batches, run.batch, run.env, loss_fn), {"fused_loss": loss_fn.fused}

    def loss(self, setup: StepSetup) -> CausalLMLoss:
        """The training loss, fused with the output layer unless asked not to or it cannot be; says which."""
        model, run = setup.engine.module, setup.run
        why_not = fused_unavailable(model, setup.stage) if self.fused_loss else "--no-fused_loss"
        if why_not is None and run.layout.tensor > 1:
            why_not = "tensor parallelism: DeepSpeed's AutoTP owns the output layer"
        loss_fn = CausalLMLoss(model, fused=why_not is None)
        run.say("Loss: output layer and cross-entropy fused, in chunks of rows (the logits are never held whole)"
                if loss_fn.fused else f"Loss: cross-entropy over the model's logits ({why_not})")
        return loss_fn
