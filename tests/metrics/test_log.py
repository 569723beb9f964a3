"""metrics.jsonl: a torn last line (a run killed while writing) is dropped with a word, everywhere it is read."""

import json

import pytest

from gpt_recipes.errors import UserError
from gpt_recipes.metrics.log import MetricsLog, read_metrics
from gpt_recipes.metrics.summary import summarize

LINES = [{"step": s, "tokens": 1024 * s, "loss": 5.0 - s / 10, "tokens_per_sec": 1000.0, "step_time": 1.0}
         for s in range(1, 6)]


def _torn(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in LINES) + '{"step": 6, "tokens": 61')
    return path


def test_a_torn_last_line_is_dropped_and_said(tmp_path):
    said = []
    assert read_metrics(_torn(tmp_path / "metrics.jsonl"), warn=said.append) == LINES
    assert len(said) == 1 and "dropped its last line, which was cut short" in said[0]


def test_a_broken_line_elsewhere_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n{broken\n" + json.dumps(LINES[1]) + "\n")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_metrics(path)
    path.write_text(json.dumps(LINES[0]) + "\n{broken\n")  # complete (newline-terminated) yet broken
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_metrics(path)


def test_resume_rewrites_the_log_without_the_torn_line(tmp_path):
    _torn(tmp_path / "metrics.jsonl")
    log = MetricsLog(tmp_path, enabled=True, resume_step=3)
    log.write({"step": 4, "loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [*LINES[:3], {"step": 4, "loss": 1.0}]


def test_the_summariser_reads_a_run_with_a_torn_line(tmp_path, capsys):
    _torn(tmp_path / "metrics.jsonl")
    summary = summarize(tmp_path)
    assert summary.steps == 5
    assert "dropped its last line" in capsys.readouterr().err
