"""The benchmark's second reference: benchmarks/minimal_deepspeed_loop.py."""

import json

import pytest

from tests.helpers import PARITY_STEPS, ds_json, read_metrics, run_python


@pytest.mark.slow
def test_the_minimal_loop_trains_what_the_recipe_trains(tmp_path, cross_stage, tiny_data, tiny_model):
    """Same model, data, batch order and JSON as the recipe's 1-rank ZeRO-0 reference run: the same
    per-step losses. Its --profile_step writes the step's profile as the recipe's does."""
    out = tmp_path / "minimal"
    proc = run_python("benchmarks/minimal_deepspeed_loop.py",
                      ["--deepspeed_config", ds_json(tmp_path, 0, micro=4, fp32=True, clip=True), "--data",
                       str(tiny_data), "--model", str(tiny_model), "--seq_len", "64", "--max_steps", str(PARITY_STEPS),
                       "--log_interval", "1", "--profile_step", "3", "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe, _ = read_metrics(cross_stage[0])
    minimal, _ = read_metrics(out)
    assert [r["step"] for r in minimal] == list(range(1, PARITY_STEPS + 1))
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(recipe, minimal))
    print(f"minimal DeepSpeed loop vs recipe, ZeRO-0 fp32: max |loss diff| {worst:.2e}")
    assert worst < 1e-5
    assert all(r["tokens_per_sec"] > 0 for r in minimal if r["step"] != 3) and "minimal DeepSpeed:" in proc.stdout
    profile = json.loads((out / "profile" / "step3.json").read_text())
    assert profile["step"] == 3 and profile["top"] and profile["total_ms"] > 0
    assert "profile of step 3" in proc.stdout
