"""The training loop shared by the recipes: step, log, evaluate, save.

The loop never waits on the device except at logging, evaluation and save points: the
per-step loss is accumulated on the device and reduced across ranks only when logged.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from gpt_recipes import faults
from gpt_recipes.console import resume_command
from gpt_recipes.checkpoints import paths
from gpt_recipes.data.tokens import GlobalBatchOrder
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import DivergedError, RecipeExit
from gpt_recipes.metrics.log import MetricsLog
from gpt_recipes.metrics.memory import MemoryProbe, peak_memory_mb
from gpt_recipes.metrics.profile import profiled_step
from gpt_recipes.metrics.throughput import ThroughputWindow, speed_text
from gpt_recipes.models.loss import CausalLMLoss
from gpt_recipes.parallel.distributed import DistEnv, all_reduce, rank_max, remove_own_shm_buffers
from gpt_recipes.train.preemption import LAUNCHER_GONE, PeerWatch, StopSignal


class Samples(Protocol):
    """What the loop trains and evaluates on: pretraining windows or fine-tuning examples."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(model inputs, next-token targets with -100 where no loss is taken)."""

    def num_tokens(self, indices: np.ndarray) -> int:
        """Tokens the model reads for these samples (padding excluded)."""

    def num_targets(self, indices: np.ndarray) -> int:
        """Tokens a loss is taken on (targets other than -100) in these samples."""


@dataclass
class LoopSettings:
    max_steps: int
    seq_len: int
    log_interval: int
    eval_interval: int
    save_interval: int
    out_dir: Path
    device_type: str
    flops_per_token: float = 0.0  # model FLOPs (forward + backward) per token; see flops.py
    peak_tflops: float | None = None  # per rank, for MFU
    global_batch: int = 1
    profile_step: int = 0  # record this step with torch.profiler (0: none)
    # Run after each validation pass on every rank (downstream tasks on the live model): more
    # metrics for the evaluation record.
    downstream: Callable[[Any], dict[str, float]] | None = None


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    val_loss: float | None = None  # measured at this step (a checkpoint saved now is ranked by it)
    val_step: int = -1

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        measured = {"val_loss": self.val_loss} if self.val_step == self.step and self.val_loss is not None else {}
        return {"step": self.step, "tokens": self.tokens, **measured, **extra}


@dataclass
class Batches:
    """Training samples in their global order, and this rank's validation micro-batches."""

    train: Samples
    order: GlobalBatchOrder
    val: Samples
    val_micro_batches: list[np.ndarray]


def _to_device(batch: tuple[dict[str, torch.Tensor], torch.Tensor], device: torch.device):
    inputs, targets = batch
    if device.type == "cpu":
        return inputs, targets
    move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return {k: move(v) for k, v in inputs.items()}, move(targets)


class TrainStep(Protocol):
    """The part of the loop a kind of run supplies: one optimizer step, and a validation pass."""

    probes_memory: bool  # it fills the memory probe when handed one

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe: MemoryProbe | None,
                 window: ThroughputWindow) -> torch.Tensor:
        """Train on global batch `step`; returns this rank's share of the loss sum the loop logs
        (summed over ranks and divided by steps x accumulation x data-parallel ranks, the mean)."""

    def evaluate(self, engine) -> dict[str, float]:
        """val_loss over all ranks' validation samples, and any further val_ means."""

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """The objective's own training means since the last call (DPO's rewards), or nothing."""


class DataParallelStep:
    """The step of a data-parallel run (any ZeRO stage, sequence or tensor parallel): forward,
    engine.backward and engine.step for each of this rank's micro-batches."""

    probes_memory = True

    def __init__(self, batches: Batches, plan: BatchPlan, env: DistEnv, loss_fn: CausalLMLoss):
        self.batches, self.plan, self.env, self.loss_fn = batches, plan, env, loss_fn
        self.reports_perplexity = getattr(loss_fn, "reports_perplexity", True)

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        return self.loss_fn.take_metrics(prefix) if hasattr(self.loss_fn, "take_metrics") else {}

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe: MemoryProbe | None,
                 window: ThroughputWindow) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their summed loss (on the device).

        The step's loss is the mean over every target token of the global batch, however the batch is
        split into ranks and micro-batches (fine-tuning examples differ in length): each micro-batch's
        summed loss is scaled so that DeepSpeed's averaging over ranks and accumulation steps yields it
        (a sequence-parallel rank's loss covers its part of each sample). With a probe, the first
        micro-batch's activations and the model states before the update are measured."""
        batches, plan, env, loss_fn = self.batches, self.plan, self.env, self.loss_fn
        scale = plan.grad_accum * plan.grad_divisor / max(1, batches.train.num_targets(global_batch))
        total = torch.zeros((), device=engine.device)
        for micro_step in range(plan.grad_accum):
            idx = batches.order.micro_batch(step, plan.data_rank(env.rank), micro_step)
            inputs, targets = _to_device(batches.train.batch(idx), engine.device)
            with probe.saved_activations() if probe and micro_step == 0 else contextlib.nullcontext():
                loss = loss_fn(engine, inputs, targets, reduction="sum") * scale
            loss = faults.poison_loss(loss, step + 1, env.rank)
            engine.backward(loss)
            if probe and micro_step == 0:
                probe.finish_activations()
            if probe and micro_step == plan.grad_accum - 1:
                with window.paused():  # keep the reading out of throughput
                    probe.read_model_states()
            engine.step()
            total += loss.detach()
        return total

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Over all ranks' validation samples: val_loss, the mean loss per target (a token, or a
        preference pair), and any further means the objective reports, prefixed val_."""
        batches = self.batches
        engine.eval()
        loss_fn = self.loss_fn.for_evaluation() if hasattr(self.loss_fn, "for_evaluation") else self.loss_fn
        names = getattr(batches.val, "names", [None])  # a mixture's sources, each evaluated on its own
        total = torch.zeros(len(names), 2, dtype=torch.float64, device=engine.device)
        for idx in batches.val_micro_batches:
            inputs, targets = _to_device(batches.val.batch(idx), engine.device)
            k = batches.val.source_of(idx[0]) if len(names) > 1 else 0
            total[k, 0] += loss_fn(engine, inputs, targets, reduction="sum").double()
            total[k, 1] += batches.val.num_targets(idx)
        engine.train()
        all_reduce(total)
        extra = loss_fn.take_metrics("val_") if hasattr(loss_fn, "take_metrics") else {}
        overall = (total[:, 0].sum() / total[:, 1].sum()).item()
        if len(names) > 1:
            extra["val_loss_by_source"] = {name: (t[0] / t[1]).item() for name, t in zip(names, total)}
        return {"val_loss": overall, **extra}


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


def train(
    engine,
    batches: Batches,
    plan: BatchPlan,
    env: DistEnv,
    settings: LoopSettings,
    state: TrainState,
    metrics: MetricsLog,
    train_step: TrainStep,
    save_checkpoint: Callable[[TrainState], Path],
) -> TrainState:
    """Train until settings.max_steps; raises DivergedError on a non-finite loss (without saving) and
    Preempted after saving when any rank receives SIGTERM/SIGINT."""
    stop = StopSignal(on_insist=remove_own_shm_buffers)
    watch = PeerWatch(env.rank, lambda: paths.latest_tag(paths.checkpoints_dir(settings.out_dir)))
    # Setting up leaves about half a million Python objects (transformers, DeepSpeed, the data);
    # a full garbage collection walks all of them, 0.3 s here, every few hundred steps. Frozen,
    # collections walk only what the loop itself creates.
    gc.collect()
    gc.freeze()
    try:
        return _train(engine, batches, plan, env, settings, state, metrics, train_step, save_checkpoint, stop)
    except Exception as err:
        if not isinstance(err, RecipeExit):  # planned ends (a save on a signal, a NaN) all ranks agree on
            watch.report_if_peer_lost(wait=10.0)  # a collective that broke because another rank died: say that
        raise
    finally:
        watch.stop()  # first: from here on the ranks end at their own pace
        gc.unfreeze()
        stop.restore()


def _train(engine, batches, plan, env, settings, state, metrics, train_step, save_checkpoint, stop) -> TrainState:
    say = tqdm.write if env.is_main else (lambda *_: None)
    bar = tqdm(total=settings.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not env.is_main or not sys.stderr.isatty())
    good_step = state.step  # the last step known to have a finite loss

    def run_eval() -> float:
        result = train_step.evaluate(engine)
        val_loss = result["val_loss"]
        if not math.isfinite(val_loss):
            raise _diverged(state.step, good_step, settings.out_dir, "validation loss")
        if getattr(train_step, "reports_perplexity", True):
            result["val_ppl"] = math.exp(min(val_loss, 50.0))
        if settings.downstream is not None:
            result.update(settings.downstream(engine))
        metrics.write({"step": state.step, "tokens": state.tokens, **result})
        say(f"step {state.step:>6d} | " + " | ".join(_shown(k, v) for k, v in result.items()))
        state.val_loss, state.val_step = val_loss, state.step
        return val_loss

    def save() -> None:
        path = save_checkpoint(state)
        best = paths.best_tag(path.parent) == path.name
        say(f"step {state.step:>6d} | saved checkpoint {path}" + (" (the best by validation loss so far: "
                                                                   f"{paths.BEST} names it)" if best else ""))

    if state.step == 0:
        run_eval()

    loss_sum = torch.zeros((), device=engine.device)
    window = ThroughputWindow(settings.flops_per_token, env.world_size, settings.peak_tflops, settings.global_batch)

    def window_loss() -> float:
        """Mean loss since the last log line over all ranks and micro-steps (waits for the device)."""
        total = all_reduce(loss_sum.clone()).item()
        # Each data-parallel rank's share, split over its sequence-parallel group or repeated by
        # each rank of its tensor-parallel group.
        mean = total / (window.all_steps * plan.grad_accum * plan.grad_divisor * plan.tp)
        if not math.isfinite(mean):
            raise _diverged(state.step, good_step, settings.out_dir, "training loss")
        return mean

    timers = EngineTimers(engine)
    probe = MemoryProbe(engine.module, settings.device_type)
    # The second step of this process (optimizer state exists by then), where the step can measure.
    probe_step = state.step + 1 if train_step.probes_memory else -1
    compiled_s = 0.0  # torch.compile's time so far, as last said
    probed = False  # one-off readings, agreed across ranks and logged with the next metrics line

    while state.step < settings.max_steps:
        probing = state.step == probe_step
        profiling = state.step + 1 == settings.profile_step  # under torch.profiler, kept out of throughput
        global_batch = batches.order.global_batch(state.step)
        with (profiled_step(state.step + 1, settings.out_dir, settings.device_type, env.is_main)
              if profiling else contextlib.nullcontext()), window.paused() if profiling else contextlib.nullcontext():
            loss_sum += train_step(engine, state.step, global_batch, probe if probing else None, window)
        probed |= probing
        timers.after_step()
        step_tokens = batches.train.num_tokens(global_batch)  # host-side count
        state.step += 1
        state.tokens += step_tokens
        window.add_step(step_tokens, timed=not profiling)
        bar.update(1)
        last = state.step == settings.max_steps
        faults.after_step(state.step, env.rank)
        signum = stop.agreed()

        if _is_due(state.step, settings.log_interval, last) or signum:
            mean_loss = window_loss()
            good_step = state.step
            peak = rank_max(peak_memory_mb(settings.device_type), engine.device)
            memory_fields = {"model_state_mb": rank_max(probe.model_state_mb, engine.device),
                             "activation_mb": rank_max(probe.activation_mb, engine.device)} if probed else {}
            record = {
                "step": state.step,
                "tokens": state.tokens,
                "loss": mean_loss,
                "lr": engine.get_lr()[0],
                "grad_norm": _grad_norm(engine),
                **window.record(),
                **timers.window_means(),
                "peak_mem_mb": peak,
                # fp16 steps the loss scaler skipped after an overflow: expected, not a failure.
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                **memory_fields,
                **train_step.take_metrics(),
                **(batches.order.source_counts(state.step) if hasattr(batches.order, "source_counts") else {}),
            }
            if record.get("compile_s", 0.0) > compiled_s:
                compiled_s = record["compile_s"]
                say(f"step {state.step:>6d} | compiling took {compiled_s:.1f} s so far (kept out of tokens/s)")
            if memory_fields:
                say(f"memory, fullest rank: model states {memory_fields['model_state_mb']:.0f} MiB (parameters, "
                    f"gradients, optimizer state); activations {memory_fields['activation_mb']:.0f} MiB per micro-batch")
            probed = False
            metrics.write(record)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_sec'] or 0:.0f}")
            say(_train_line(record))
            loss_sum.zero_()
            window.reset()

        if signum:
            save()
            bar.close()
            raise Preempted(signum, state.step)

        with window.paused():  # keep evaluation and saving out of throughput
            if _is_due(state.step, settings.eval_interval, last):
                run_eval()
            if _is_due(state.step, settings.save_interval, last):
                if window.all_steps:
                    window_loss()  # never save weights that a NaN may already have reached
                save()
    bar.close()
    return state


def _train_line(record: dict[str, Any]) -> str:
    mfu = f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""
    tflops = f" | {record['tflops_per_rank']:.3g} TFLOP/s/rank" if record["tflops_per_rank"] is not None else ""
    rewards = (f" | reward acc {record['reward_accuracy']:.3f} margin {record['reward_margin']:.3f} | chosen "
               f"NLL {record['nll_chosen']:.3f}/token" if "reward_accuracy" in record else "")
    if "generation_ms" in record:  # GRPO: what the completions earned, and what generating them cost
        rewards = (f" | reward {record['reward']:.3f} (std {record['reward_std']:.3f}) | length "
                   f"{record['completion_length']:.1f} | generation {record['generation_ms']:.0f} ms, training "
                   f"{record['training_ms']:.0f} ms")
    return (f"step {record['step']:>6d} | loss {record['loss']:.4f}{rewards} | lr {record['lr']:.2e} | "
            f"{speed_text({**record, 'compile_s': None})}{tflops}{mfu} | peak {record['peak_mem_mb']:.0f} MiB")


def _shown(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"{key} " + " ".join(f"{name} {v:.4f}" for name, v in value.items())
    return f"{key} {value:.2f}" if key == "val_ppl" else f"{key} {value:.4f}"


def _diverged(step: int, good_step: int, out_dir: Path, what: str) -> DivergedError:
    tag = paths.latest_tag(paths.checkpoints_dir(out_dir))
    kept = f"the last good checkpoint, {tag}, is kept" if tag else "no checkpoint was written"
    return DivergedError(f"the {what} became NaN or infinite between steps {good_step} and {step}; {kept}. "
                         f"Lower the learning rate, or use bf16 or fp32 instead of fp16, and continue with: "
                         f"{resume_command()}")


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
