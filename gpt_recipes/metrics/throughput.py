"""Throughput between two log lines: tokens and samples per second, step time, TFLOP/s and MFU.

Shared by the recipes' loop and the reference loops, so all report the same quantities from
the same arithmetic. Time torch spends compiling (torch.compile's first steps and any
recompilation) is left out, as evaluation and saving are, and reported as compile_s.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from gpt_recipes.metrics import flops
from gpt_recipes.models.compile import compile_seconds


class ThroughputWindow:
    """Counts steps, tokens and wall time since the last log line; pauses (evaluation, saving,
    one-off readings) are left out of the time."""

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float | None, global_batch: int):
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.peak_tflops, self.global_batch = peak_tflops, global_batch
        self._compiled = compile_seconds()  # as of the last step (or pause)
        self.reset()

    def reset(self) -> None:
        self.steps = self.tokens = 0  # timed steps and their tokens
        self.untimed_steps = 0  # steps left out of the figures (a profiled one)
        self.start = time.perf_counter()

    @property
    def all_steps(self) -> int:
        return self.steps + self.untimed_steps

    def add_step(self, tokens: int, timed: bool = True) -> None:
        """Count a finished step; an untimed one's time must have been paused (`paused`)."""
        if timed:
            self.steps += 1
            self.tokens += tokens
        else:
            self.untimed_steps += 1
        compiled = compile_seconds()
        if compiled != self._compiled:  # compiling is a one-off cost, not the step's
            self.start += compiled - self._compiled
            self._compiled = compiled

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began
            self._compiled = compile_seconds()  # compiling during the pause is left out already

    def record(self) -> dict[str, float | None]:
        """The window's figures, as the metrics log names them (None when none of its steps was
        timed: a window of one profiled step); then `reset` starts the next window."""
        elapsed = time.perf_counter() - self.start
        record: dict[str, float | None] = dict.fromkeys(("step_time", "tokens_per_sec", "samples_per_sec",
                                                         "tflops_per_rank", "mfu"))
        if self.steps:
            tokens_per_sec = self.tokens / elapsed
            tflops, mfu = flops.mfu(self.flops_per_token, tokens_per_sec, self.world_size, self.peak_tflops)
            record.update(step_time=elapsed / self.steps, tokens_per_sec=tokens_per_sec,
                          samples_per_sec=self.steps * self.global_batch / elapsed, tflops_per_rank=tflops, mfu=mfu)
        if self._compiled:
            record["compile_s"] = self._compiled  # in this process so far
        return record


def speed_text(record: dict) -> str:
    """A log line's throughput part: tokens/s and ms per step, and compile time when there was some."""
    if record["tokens_per_sec"] is None:
        text = "no timed step (profiled)"
    else:
        text = f"{record['tokens_per_sec']:.0f} tok/s | {record['step_time'] * 1e3:.0f} ms/step"
    return text + (f" | compiled {record['compile_s']:.1f} s (not in tok/s)" if record.get("compile_s") else "")
