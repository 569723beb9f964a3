import time

import pytest

from gpt_recipes.metrics.throughput import ThroughputWindow


def test_a_window_counts_its_steps_and_leaves_pauses_out():
    window = ThroughputWindow(flops_per_token=6e6, world_size=2, peak_tflops=1.0, global_batch=8)
    time.sleep(0.05)
    window.add_step(1000)
    with window.paused():
        time.sleep(0.3)  # an evaluation: not counted
    window.add_step(1000)
    record = window.record()
    assert 0.05 <= 2 * record["step_time"] < 0.25
    assert record["tokens_per_sec"] == pytest.approx(2000 / (2 * record["step_time"]))
    assert record["samples_per_sec"] == pytest.approx(16 / (2 * record["step_time"]))
    assert record["tflops_per_rank"] == pytest.approx(6e6 * record["tokens_per_sec"] / 2 / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops_per_rank"])
    window.reset()
    assert window.steps == window.tokens == 0
    assert ThroughputWindow(6e6, 1, None, 8).record()["mfu"] is None
