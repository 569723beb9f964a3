"""What a kind of training supplies, and all that the loop, the runner and the summariser know of it.

An objective (next-token prediction, DPO, KTO, GRPO) is a part: once the engine exists it makes
the loop's step; it says its part of each log line, names the evaluation figure that ranks
checkpoints and which way is better, declares the parallel layouts it can run on, records its
settings, and tells the summariser which of its figures make table columns and curves. The
core asks these questions of every objective alike and names none.

A new objective is a module with an Objective subclass (its flags, settings and checks beside
it), a recipe that hands an instance to runner.Job, and a line in REGISTERED so that summaries
of its runs show its columns and curves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from gpt_recipes.checkpoints.paths import BestMetric
from gpt_recipes.metrics.summary import Report
from gpt_recipes.parallel.layout import Supports


@dataclass
class StepResult:
    """What one optimizer step hands the loop."""

    loss: torch.Tensor  # this rank's share of the step's loss, on the device (see TrainStep.__call__)
    tokens: int  # tokens the step processed over all ranks (a host count: nothing waits for the device)


class TrainStep(Protocol):
    """One optimizer step over a global batch, and a validation pass."""

    probes_memory: bool  # it fills the memory probe when handed one

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe, window) -> StepResult:
        """Train on global batch `step`. The loop sums the results' losses over ranks and steps and
        divides by steps x the plan's loss_divisor: the mean loss."""

    def evaluate(self, engine) -> dict[str, Any]:
        """Held-out figures over all ranks (a collective); the objective's best metric among them."""

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """The objective's own figures since the last call (a collective), or {}."""


@dataclass
class StepSetup:
    """What an objective's step is made from, once the engine exists."""

    engine: Any
    batches: Any  # train.loop.Batches
    run: Any  # runner.RunPlan: the resolved JSON, batch plan, output folder, say()
    stage: int  # ZeRO stage
    seed: int


class Objective:
    """Base class of the objectives; see the module docstring."""

    name: ClassVar[str]  # what config.json and each checkpoint record as the objective
    title: ClassVar[str]  # as messages name it
    best: ClassVar[BestMetric] = BestMetric()
    report: ClassVar[Report] = Report()
    supports: Supports = Supports()  # the layouts besides data parallelism it runs on

    def make_step(self, setup: StepSetup) -> tuple[TrainStep, dict[str, Any]]:
        """The loop's step, and the facts making it learned (for config.json)."""
        raise NotImplementedError

    def line_text(self, record: dict[str, Any]) -> str:
        """Its figures in a training log line, after the loss (e.g. " | reward 0.512")."""
        return ""

    def config_record(self) -> dict[str, Any]:
        """Its settings, as config.json and each checkpoint record them."""
        return {}


# Every objective the summariser asks for columns and curves; registering one is a line here.
REGISTERED = (
    "gpt_recipes.train.lm:NextToken",
    "gpt_recipes.train.preference:DPO",
    "gpt_recipes.train.kto:KTO",
    "gpt_recipes.train.grpo:GRPO",
)


def registered() -> list[type[Objective]]:
    found = []
    for entry in REGISTERED:
        module, name = entry.split(":")
        found.append(getattr(importlib.import_module(module), name))
    return found


def reports() -> list[Report]:
    """What the summariser shows of each registered objective's runs (tools pass it to metrics/summary.py)."""
    from gpt_recipes.train import router_balance

    return [objective.report for objective in registered()] + [router_balance.REPORT]
