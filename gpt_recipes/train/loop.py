"""The training loop shared by the recipes: step, log, evaluate, save.

The loop runs any objective's step (train/objective.py) and never waits on the device except
at logging, evaluation and save points: the per-step loss is accumulated on the device and
reduced across ranks only when logged.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from gpt_recipes import faults
from gpt_recipes import console
from gpt_recipes.checkpoints import paths
from gpt_recipes.checkpoints.paths import BestMetric
from gpt_recipes.console import resume_command
from gpt_recipes.data.samples import Samples
from gpt_recipes.data.tokens import GlobalBatchOrder
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import DivergedError, RankError, RecipeExit
from gpt_recipes.metrics.log import MetricsLog
from gpt_recipes.metrics.memory import MemoryProbe, peak_memory_mb
from gpt_recipes.metrics.profile import profiled_step
from gpt_recipes.metrics.throughput import ThroughputWindow, speed_text
from gpt_recipes.parallel.distributed import DistEnv, all_reduce, rank_max, remove_own_shm_buffers
from gpt_recipes.train.objective import Objective, TrainStep
from gpt_recipes.train.preemption import LAUNCHER_GONE, PeerWatch, StopSignal, ending_together, mark_said


@dataclass
class LoopSettings:
    max_steps: int
    log_interval: int
    eval_interval: int
    save_interval: int
    out_dir: Path
    device_type: str
    flops_per_token: float = 0.0  # model FLOPs (forward + backward) per token; see flops.py
    peak_tflops: float | None = None  # per rank, for MFU
    profile_step: int = 0  # record this step with torch.profiler (0: none)
    # Run after each validation pass on every rank (downstream tasks on the live model): more
    # figures for the evaluation record.
    downstream: Callable[[Any], dict[str, float]] | None = None


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    best_value: float | None = None  # the objective's best metric, measured at `best_step`
    best_step: int = -1

    def as_dict(self, best_key: str, **extra: Any) -> dict[str, Any]:
        """What a checkpoint saved now records: a checkpoint is ranked by the metric measured at its step."""
        measured = {best_key: self.best_value} if self.best_step == self.step and self.best_value is not None else {}
        return {"step": self.step, "tokens": self.tokens, **measured, **extra}


@dataclass
class Batches:
    """Training samples in their global order, and this rank's validation micro-batches."""

    train: Samples
    order: GlobalBatchOrder
    val: Samples
    val_micro_batches: list[np.ndarray]


class EngineTimers:
    """DeepSpeed's forward / backward / optimizer-step times, when the JSON turns them on
    ("wall_clock_breakdown": true; DeepSpeed then synchronises the device around each phase
    and prints every micro-step). Off, this costs nothing."""

    PHASES = {"fwd": "forward_ms", "bwd": "backward_ms", "step": "optimizer_ms"}

    def __init__(self, engine):
        self.engine = engine
        self.enabled = bool(engine.wall_clock_breakdown())
        self.sums = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0

    def after_step(self) -> None:
        if self.enabled:
            snapshot = self.engine.get_wall_clock_timers()  # the last optimizer step's, in ms
            for name in self.PHASES:
                self.sums[name] += float(snapshot.get(name, 0.0))
            self.steps += 1

    def window_means(self) -> dict[str, float]:
        """Mean ms per optimizer step since the last call (empty when off)."""
        if not self.enabled or not self.steps:
            return {}
        means = {field: self.sums[name] / self.steps for name, field in self.PHASES.items()}
        self.sums = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        return means


def _is_due(step: int, interval: int, last: bool) -> bool:
    return last or (interval > 0 and step % interval == 0)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def train(engine, batches: Batches, plan: BatchPlan, env: DistEnv, settings: LoopSettings, state: TrainState,
          metrics: MetricsLog, objective: Objective, train_step: TrainStep,
          save_checkpoint: Callable[[TrainState], Path]) -> TrainState:
    """Train until settings.max_steps; raises DivergedError on a non-finite loss (without saving) and
    Preempted after saving when any rank receives SIGTERM/SIGINT."""
    def last_checkpoint():
        return paths.latest_tag(paths.checkpoints_dir(settings.out_dir))

    stop = StopSignal(on_insist=remove_own_shm_buffers, last_checkpoint=last_checkpoint)
    watch = PeerWatch(env.rank, last_checkpoint, stop, on_exit=remove_own_shm_buffers)
    # Setting up leaves about half a million Python objects (transformers, DeepSpeed, the data);
    # a full garbage collection walks all of them, 0.3 s here, every few hundred steps. Frozen,
    # collections walk only what the loop itself creates.
    gc.collect()
    gc.freeze()
    try:
        loop = _Loop(engine, batches, plan, env, settings, state, metrics, objective, train_step, save_checkpoint)
        return loop.run(stop)
    except Exception as err:
        if isinstance(err, RankError):  # this rank alone: it says why, and its peers need not guess
            mark_said()
        if not isinstance(err, RecipeExit):  # planned ends (a save on a signal, a NaN) all ranks agree on
            watch.report_if_peer_lost(wait=10.0)  # a collective that broke because another rank died: say that
        raise
    finally:
        watch.stop()  # first: from here on the ranks end at their own pace
        gc.unfreeze()
        stop.restore()


class _Loop:
    """One run of the loop: steps, and at their intervals log lines, evaluations and checkpoints."""

    def __init__(self, engine, batches, plan, env, settings, state, metrics, objective, train_step, save_checkpoint):
        self.engine, self.batches, self.plan, self.env, self.settings = engine, batches, plan, env, settings
        self.state, self.metrics, self.objective, self.train_step = state, metrics, objective, train_step
        self.save_checkpoint = save_checkpoint
        self.say = tqdm.write if env.is_main else (lambda *_: None)
        self.bar = tqdm(total=settings.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not env.is_main or not sys.stderr.isatty())
        self.good_step = state.step  # the last step known to have a finite loss
        self.loss_sum = torch.zeros((), device=engine.device)
        self.window = ThroughputWindow(settings.flops_per_token, env.world_size, settings.peak_tflops,
                                       plan.global_batch)
        self.timers = EngineTimers(engine)
        self.probe = MemoryProbe(engine.module, settings.device_type)
        # The second step of this process (optimizer state exists by then), where the step can measure.
        self.probe_step = state.step + 1 if train_step.probes_memory else -1
        self.compiled_s = 0.0  # torch.compile's time so far, as last said
        self.best_seen: tuple[float, int] | None = None  # the best evaluation of this process: (value, step)
        self.probed = False  # one-off readings, agreed across ranks and logged with the next metrics line

    def run(self, stop: StopSignal) -> TrainState:
        state, settings = self.state, self.settings
        if state.step == 0:
            self.evaluate()
        while state.step < settings.max_steps:
            self.one_step()
            last = state.step == settings.max_steps
            faults.after_step(state.step, self.env.rank)
            signum = stop.agreed()
            if _is_due(state.step, settings.log_interval, last) or signum:
                self.log()
            if signum:
                self.save()
                self.bar.close()
                ending_together()
                raise Preempted(signum, state.step)
            with self.window.paused():  # keep evaluation and saving out of throughput
                if _is_due(state.step, settings.eval_interval, last):
                    self.evaluate()
                if _is_due(state.step, settings.save_interval, last):
                    if self.window.all_steps:
                        self.window_loss()  # never save weights that a NaN may already have reached
                    self.save()
        self.bar.close()
        return state

    def one_step(self) -> None:
        state, settings, window = self.state, self.settings, self.window
        probing = state.step == self.probe_step
        profiling = state.step + 1 == settings.profile_step  # under torch.profiler, kept out of throughput
        global_batch = self.batches.order.global_batch(state.step)
        with (profiled_step(state.step + 1, settings.out_dir, settings.device_type, self.env.is_main)
              if profiling else contextlib.nullcontext()), window.paused() if profiling else contextlib.nullcontext():
            result = self.train_step(self.engine, state.step, global_batch, self.probe if probing else None, window)
        self.loss_sum += result.loss
        self.probed |= probing
        self.timers.after_step()
        state.step += 1
        state.tokens += result.tokens
        window.add_step(result.tokens, timed=not profiling)
        self.bar.update(1)

    def window_loss(self) -> float:
        """Mean loss since the last log line over all ranks and micro-steps (waits for the device)."""
        total = all_reduce(self.loss_sum.clone()).item()
        mean = total / (self.window.all_steps * self.plan.loss_divisor)
        if not math.isfinite(mean):
            raise self.diverged("training loss")
        return mean

    def log(self) -> None:
        state, engine = self.state, self.engine
        mean_loss = self.window_loss()
        self.good_step = state.step
        peak = rank_max(peak_memory_mb(self.settings.device_type), engine.device)
        memory = {"model_state_mb": rank_max(self.probe.model_state_mb, engine.device),
                  "activation_mb": rank_max(self.probe.activation_mb, engine.device)} if self.probed else {}
        record = {"step": state.step, "tokens": state.tokens, "loss": mean_loss, "lr": engine.get_lr()[0],
                  "grad_norm": _grad_norm(engine), **self.window.record(), **self.timers.window_means(),
                  "peak_mem_mb": peak,
                  # fp16 steps the loss scaler skipped after an overflow: expected, not a failure.
                  "skipped_steps": int(engine.skipped_steps),
                  **memory, **self.train_step.take_metrics(), **self.batches.order.source_counts(state.step)}
        if record.get("compile_s", 0.0) > self.compiled_s:
            self.compiled_s = record["compile_s"]
            self.say(f"step {state.step:>6d} | compiling took {self.compiled_s:.1f} s so far (kept out of tokens/s)")
        if memory:
            self.say(f"memory, fullest rank: model states {memory['model_state_mb']:.0f} MiB (parameters, gradients, "
                     f"optimizer state); activations {memory['activation_mb']:.0f} MiB per micro-batch")
        self.probed = False
        self.metrics.write(record)
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_sec'] or 0:.0f}")
        self.say(_train_line(record, self.objective.line_text(record)))
        self.loss_sum.zero_()
        self.window.reset()

    def evaluate(self) -> None:
        state, best = self.state, self.objective.best
        with console.heartbeat(f"step {state.step} evaluation", show=self.env.is_main):
            result = self.train_step.evaluate(self.engine)
        value = result[best.key]
        if not math.isfinite(value):
            raise self.diverged(f"held-out {best.key}")
        if self.settings.downstream is not None:
            result.update(self.settings.downstream(self.engine))
        self.metrics.write({"step": state.step, "tokens": state.tokens, **result})
        self.say(f"step {state.step:>6d} | " + " | ".join(_shown(k, v) for k, v in result.items()))
        state.best_value, state.best_step = value, state.step
        if state.step and best.better(value, self.best_seen[0] if self.best_seen else None):  # step 0: no checkpoint
            self.best_seen = (value, state.step)

    def save(self) -> None:
        path = self.save_checkpoint(self.state)
        seen = self.best_seen
        unsaved = seen if seen and not paths.is_complete(path.parent / paths.tag_for(seen[1])) else None
        self.say(f"step {self.state.step:>6d} | saved checkpoint {path}"
                 + best_note(self.objective.best, paths.best_tag(path.parent) == path.name, unsaved,
                             self.settings.eval_interval))

    def diverged(self, what: str) -> DivergedError:
        ending_together()  # every rank read the same all-reduced loss
        tag = paths.latest_tag(paths.checkpoints_dir(self.settings.out_dir))
        kept = f"the last good checkpoint, {tag}, is kept" if tag else "no checkpoint was written"
        return DivergedError(f"the {what} became NaN or infinite between steps {self.good_step} and "
                             f"{self.state.step}; {kept}. Lower the learning rate, or use bf16 or fp32 instead of "
                             f"fp16, and continue with: {resume_command()}")


def best_note(best: BestMetric, is_best: bool, unsaved: tuple[float, int] | None, eval_interval: int) -> str:
    """What a save line says of `best`: that this checkpoint is the best saved one, and that a better
    evaluation (value, step) was measured at a step with no checkpoint, when there was one."""
    note = f" (the best saved checkpoint by {best.describe()}: {paths.BEST} names it)" if is_best else ""
    if unsaved is not None:
        value, step = unsaved
        every = f"--save_interval {eval_interval}" if eval_interval else "a --save_interval"
        note += (f"; step {step} evaluated best ({best.key} {value:.4g}) but has no checkpoint: {every} saves one at "
                 "each evaluation")
    return note


def _train_line(record: dict[str, Any], objective_text: str) -> str:
    mfu = f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
    tflops = f" | {record['tflops_per_rank']:.3g} TFLOP/s/rank" if record["tflops_per_rank"] is not None else ""
    return (f"step {record['step']:>6d} | loss {record['loss']:.4f}{objective_text} | lr {record['lr']:.2e} | "
            f"{speed_text({**record, 'compile_s': None})}{tflops}{mfu} | peak {record['peak_mem_mb']:.0f} MiB")


def _shown(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"{key} " + " ".join(f"{name} {v:.4f}" for name, v in value.items())
    return f"{key} {value:.2f}" if key == "val_ppl" else f"{key} {value:.4f}"


class Preempted(RecipeExit):
    """Stopped by a signal, or by the loss of the launcher, after saving a checkpoint; exits with
    128 + the signal number (129, as for SIGHUP, when the launcher is gone)."""

    prefix = "stopped"

    def __init__(self, signum: int, step: int):
        self.exit_code = StopSignal.exit_code(signum)
        why = ("the launcher that started the ranks is gone" if signum == LAUNCHER_GONE
               else f"{signal.Signals(signum).name} received")
        super().__init__(f"{why}: saved a checkpoint at step {step} and exited with status {self.exit_code}; "
                         f"continue with: {resume_command()}")
