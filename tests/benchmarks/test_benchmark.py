"""benchmarks/benchmark.py: a run that fails costs its own round only."""

import shutil

from tests.helpers import REPO, load_script

FIXTURE = REPO / "tests" / "fixtures" / "recipe_zero0_metrics.jsonl"  # a real run of 30 steps


def test_a_run_that_crashes_after_its_last_step_keeps_its_figures_and_one_that_fails_before_is_left_out(tmp_path):
    bench = load_script("benchmarks/benchmark.py")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "metrics.jsonl")
    notes: list[str] = []
    assert bench.kept_summary(run, "minimal DeepSpeed ZeRO-2", 0, 30, 1, notes).tokens_per_sec > 0 and not notes
    kept = bench.kept_summary(run, "minimal DeepSpeed ZeRO-2", -6, 30, 2, notes)
    assert kept is not None and kept.tokens_per_sec > 0
    assert notes[-1] == ("minimal DeepSpeed ZeRO-2, round 2: exited with status -6 after logging all 30 steps (a crash "
                         "while shutting down); its figures are kept")
    assert bench.kept_summary(run, "recipe ZeRO-2", 1, 40, 3, notes) is None
    assert notes[-1].startswith("recipe ZeRO-2, round 3: failed (exit 1) before its last step; left out")
    assert bench.kept_summary(tmp_path / "never_started", "recipe ZeRO-3", 2, 30, 1, notes) is None
