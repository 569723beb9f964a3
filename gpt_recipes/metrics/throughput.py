"""Throughput between two log lines: tokens and samples per second, step time, TFLOP/s and MFU.

Shared by the recipes' loop and the plain PyTorch reference, so both report the same
quantities from the same arithmetic.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from gpt_recipes.metrics import flops


class ThroughputWindow:
    """Counts steps, tokens and wall time since the last log line; pauses (evaluation, saving,
    one-off readings) are left out of the time."""

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float | None, global_batch: int):
        self.flops_per_token, self.world_size = flops_per_token, world_size
        self.peak_tflops, self.global_batch = peak_tflops, global_batch
        self.reset()

    def reset(self) -> None:
        self.steps = self.tokens = 0
        self.start = time.perf_counter()

    def add_step(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def record(self) -> dict[str, float | None]:
        """The window's figures, as the metrics log names them; then `reset` starts the next window."""
        elapsed = time.perf_counter() - self.start
        tokens_per_sec = self.tokens / elapsed
        tflops, mfu = flops.mfu(self.flops_per_token, tokens_per_sec, self.world_size, self.peak_tflops)
        return {"step_time": elapsed / max(1, self.steps), "tokens_per_sec": tokens_per_sec,
                "samples_per_sec": self.steps * self.global_batch / elapsed, "tflops_per_rank": tflops, "mfu": mfu}
