"""The throughput summariser on metrics files recorded from real runs (2 CPU ranks, gpt2-micro, fp32)."""

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from gpt_recipes.errors import UserError
from gpt_recipes.metrics.summary import caveats, percentile, read_lines, summarize, text_table
from tests.helpers import run_here

DATA = Path(__file__).parents[1] / "fixtures"
RECIPE = DATA / "recipe_zero0_metrics.jsonl"  # recipes/pretrain.py at ZeRO-0, 30 steps, a line every 5
PLAIN = DATA / "plain_ddp_metrics.jsonl"  # benchmarks/plain_pytorch_loop.py under torchrun, same shape


def _run_dir(tmp_path, name, recorded):
    run = tmp_path / name
    run.mkdir()
    shutil.copy(recorded, run / "metrics.jsonl")
    return run


def test_summary_values_match_the_recorded_lines(tmp_path):
    lines = read_lines(RECIPE)
    train = [r for r in lines if "tokens_per_sec" in r]
    measured = [r["tokens_per_sec"] for r in train if r["step"] > 5]  # warm-up: the first line (step 5)
    s = summarize(_run_dir(tmp_path, "zero0", RECIPE))
    assert s.steps == 30 and s.measured_lines == len(train) - 1 == 5
    assert s.tokens_per_sec == pytest.approx(statistics.median(measured))
    assert min(measured) <= s.tokens_per_sec_p10 <= s.tokens_per_sec <= s.tokens_per_sec_p90 <= max(measured)
    assert s.step_time_ms == pytest.approx(1e3 * statistics.median(r["step_time"] for r in train[1:]))
    assert s.mfu == pytest.approx(statistics.median(r["mfu"] for r in train[1:]))
    assert s.peak_mem_mb == max(r["peak_mem_mb"] for r in train)
    assert s.model_state_mb == train[0]["model_state_mb"]
    evals = [r["val_loss"] for r in lines if "val_loss" in r]
    assert (s.final_val_loss, s.best_val_loss) == (evals[-1], min(evals))
    # An explicit warm-up keeps every line.
    assert summarize(_run_dir(tmp_path, "all", RECIPE), warmup_steps=0).measured_lines == len(train)


def test_a_short_run_says_its_figures_rest_on_few_lines(tmp_path):
    lines = [json.loads(line) for line in RECIPE.read_text().splitlines() if line.strip()]
    run = tmp_path / "short"
    run.mkdir()
    kept = [r for r in lines if "tokens_per_sec" not in r or r["step"] <= 10]  # two training lines
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    short, full = summarize(run), summarize(_run_dir(tmp_path, "zero0", RECIPE))
    assert short.measured_lines == 1 and full.measured_lines == 5
    assert caveats([full]) == []
    assert caveats([full, short]) == ["note: short's throughput rests on 1 log line(s) after warm-up (p10 and p90 "
                                      "are then the same windows); run longer, or log more often (--log_interval)"]
    assert text_table([short]).splitlines()[0].split()[1:3] == ["log", "lines"]


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20], 10) == pytest.approx(11)
    assert percentile([5], 90) == 5


def test_a_run_without_evaluation_has_no_loss_figures(tmp_path):
    s = summarize(_run_dir(tmp_path, "plain", PLAIN))
    assert s.final_val_loss is None and s.model_state_mb is None and s.tokens_per_sec > 0


def test_bad_run_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        summarize(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        summarize(tmp_path)


@pytest.mark.slow
def test_cli_writes_table_csv_markdown_and_plots(tmp_path):
    runs = [str(_run_dir(tmp_path, "zero0", RECIPE)), str(_run_dir(tmp_path, "plain", PLAIN))]
    proc = run_here("tools/summarize_throughput.py", [*runs, "--csv", str(tmp_path / "s.csv"),
                                                        "--plots", str(tmp_path / "plots"), "--markdown"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = summarize(Path(runs[0]))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| zero0 |"))
    assert f"| {expected.tokens_per_sec:.0f} |" in row and f"{expected.mfu:.1%}" in row
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["name"] for r in rows] == ["zero0", "plain"]
    assert float(rows[0]["tokens_per_sec"]) == pytest.approx(expected.tokens_per_sec)
    for png in ("loss_vs_tokens.png", "tokens_per_sec.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    proc = run_here("tools/summarize_throughput.py", [str(tmp_path / "missing")])
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


def test_downstream_scores_reach_the_table_csv_and_a_plot(tmp_path):
    import json

    from gpt_recipes.metrics.summary import csv_text, markdown_table, plot

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 0, "tokens": 0, "val_loss": 6.0, "eval/docstring_choice/acc": 0.25},
             {"step": 5, "tokens": 80, "loss": 5.5, "tokens_per_sec": 100.0},
             {"step": 10, "tokens": 160, "loss": 5.0, "tokens_per_sec": 110.0},
             {"step": 10, "tokens": 160, "val_loss": 5.1, "eval/docstring_choice/acc": 0.4,
              "eval/docstring_choice/acc_norm": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(run)
    assert summary.task_scores == {"docstring_choice/acc": 0.4, "docstring_choice/acc_norm": 0.5}  # the last eval
    assert "docstring_choice/acc 0.400, docstring_choice/acc_norm 0.500" in markdown_table([summary])
    assert json.loads(next(csv.DictReader(csv_text([summary]).splitlines()))["task_scores"]) == summary.task_scores
    written = plot([run], ["run"], tmp_path / "plots")
    assert (tmp_path / "plots" / "task_scores.png") in written and (tmp_path / "plots" / "task_scores.png").stat().st_size


def test_an_moe_runs_expert_load_reaches_the_table_and_a_plot(tmp_path):
    """The summariser asks the MoE report (registered beside the objectives') for its column and curve."""
    from gpt_recipes.metrics.summary import plot, text_table
    from gpt_recipes.train.objective import reports

    run = tmp_path / "moe"
    run.mkdir()
    lines = [{"step": 0, "tokens": 0, "val_loss": 6.0, "val_expert_imbalance_max": 1.1},
             *({"step": s, "tokens": 80 * s, "loss": 6.0 - 0.1 * s, "tokens_per_sec": 100.0, "aux_loss": 2.0,
                "expert_imbalance_max": 1.0 + 0.1 * s} for s in range(1, 6)),
             {"step": 5, "tokens": 400, "val_loss": 5.6, "val_expert_imbalance_max": 1.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(run, reports=reports())
    assert summary.objective["expert_imbalance_max"] == pytest.approx(1.5)
    assert "expert load max/mean (last)" in text_table([summary]) and "1.50" in text_table([summary])
    written = plot([run], ["moe"], tmp_path / "plots", reports())
    assert (tmp_path / "plots" / "expert_load.png") in written
