"""Downstream evaluation with lm-evaluation-harness: the local task, the tool, in-training scores."""

import json
import sys

import pytest

from gpt_recipes.errors import UserError
from gpt_recipes.metrics import evaluation
from gpt_recipes.metrics.summary import markdown_table, summarize
from tests.helpers import REPO, launch, read_metrics, run_here


def _val_rows(path, count):
    with path.open("w") as f:
        for i in range(count):
            messages = [{"role": "user", "content": f"In Python's m module, what does f{i}() do?"},
                        {"role": "assistant", "content": f"Return the number {i} as a string."}]
            f.write(json.dumps({"messages": messages}) + "\n")


def test_local_task_rows_hold_the_answer_among_four(tmp_path):
    _val_rows(tmp_path / "val.jsonl", 10)
    assert evaluation.build_local_task(tmp_path / "val.jsonl", tmp_path / "a.jsonl") == 10
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        assert len(set(row["choices"])) == 4
        assert row["choices"][row["gold"]] == f"Return the number {i} as a string."
        assert f"f{i}()" in row["question"]
    assert 1 < len({r["gold"] for r in rows})  # the answer is not always in the same place
    evaluation.build_local_task(tmp_path / "val.jsonl", tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # deterministic


def test_unknown_task_lists_close_ones():
    with pytest.raises(UserError, match="unknown task 'hellaswg'.*hellaswag"):
        evaluation.resolve_tasks(["hellaswg"])
    with pytest.raises(UserError, match="unknown task 'docstring_choise'.*docstring_choice"):
        evaluation.resolve_tasks(["docstring_choise"])


def test_missing_harness_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(UserError, match=r"not installed: pip install 'lm-eval==0\.4\.13'"):
        evaluation.harness()


def test_scores_and_table_from_harness_results():
    results = {"results": {"docstring_choice": {"alias": "docstring_choice", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                                "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.05}}}
    assert evaluation.scores(results) == {"docstring_choice/acc": 0.5, "docstring_choice/acc_norm": 0.25}
    table = evaluation.table(results)
    assert "| docstring_choice | acc | 0.5000 | 0.1000 |" in table


def test_tool_bad_inputs(tmp_path):
    proc = run_here("tools/evaluate.py", [str(tmp_path / "nope")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = run_here("tools/evaluate.py", [str(tmp_path / "run")])
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, pretrained, demo):
    """A ZeRO-3 fine-tune on 2 ranks (fp32) with the local task evaluated during training, an export, and
    W&B tracking in its offline mode."""
    tmp = tmp_path_factory.mktemp("evaluated")
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg.pop("bf16")
    cfg.update(train_micro_batch_size_per_gpu=4, wandb={"enabled": True, "project": "gpt-recipes-test"})
    (tmp / "ds.json").write_text(json.dumps(cfg))
    out, hf = tmp / "run", tmp / "hf"
    launch("recipes/finetune.py", ["--deepspeed_config", str(tmp / "ds.json"), "--model_name_or_path", str(pretrained),
                                   "--data", str(demo / "train.jsonl"), "--output_dir", str(out), "--max_steps", "40",
                                   "--eval_interval", "40", "--eval_batches", "2", "--truncate",
                                   "--eval_tasks", "docstring_choice", "--export_hf", str(hf)])
    return tmp, out, hf


def _tool_scores(model, tmp, name, *extra):
    out = tmp / f"{name}.json"
    proc = run_here("tools/evaluate.py", [str(model), "--output", str(out), "--batch_size", "4", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| docstring_choice | acc |" in proc.stdout
    return evaluation.scores(json.loads(out.read_text()))


@pytest.fixture(scope="module")
def export_scores(evaluated_run):
    tmp, _, hf = evaluated_run
    return _tool_scores(hf, tmp, "export")


@pytest.mark.slow
def test_in_training_scores_equal_the_tool_on_the_export_and_the_checkpoint(evaluated_run, export_scores):
    tmp, out, hf = evaluated_run
    _, evals = read_metrics(out)
    in_training = {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    assert evals[-1]["step"] == 40 and set(in_training) == {"docstring_choice/acc", "docstring_choice/acc_norm"}
    assert evals[0]["step"] == 0 and "eval/docstring_choice/acc" in evals[0] and evals[0]["eval_tasks_s"] > 0
    on_export = export_scores
    on_checkpoint = _tool_scores(out, tmp, "checkpoint")  # ZeRO-3, 2 ranks: exported on the fly
    assert on_export == on_checkpoint == in_training, (on_export, on_checkpoint, in_training)
    summary = markdown_table([summarize(out)])
    assert f"docstring_choice/acc {in_training['docstring_choice/acc']:.3f}" in summary


@pytest.mark.slow
def test_the_fine_tuned_model_beats_the_model_it_started_from(evaluated_run, export_scores):
    """The task has four choices (chance 0.25); the pretrained base scored at step 0 is at chance, and
    fine-tuning on the demo task lifts the exported model clearly above it."""
    _, out, _ = evaluated_run
    _, evals = read_metrics(out)
    base, tuned = evals[0]["eval/docstring_choice/acc"], export_scores["docstring_choice/acc"]
    assert evals[0]["step"] == 0 and tuned > base + 0.05 and tuned > 0.25 + 0.05, (base, tuned)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_config_and_the_metrics(evaluated_run):
    _, out, _ = evaluated_run
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # rank 0 alone, no account: `wandb sync` uploads it later
    data = runs[0].read_bytes()
    for field in (b"train/loss", b"eval/val_loss", b"eval/docstring_choice/acc", b"optimizer_step"):
        assert field in data, field
    assert b'"finetune"' in data and b"zero_optimization" in data  # the resolved run config


@pytest.mark.slow  # the harness's task index takes seconds to build
def test_a_hub_task_without_its_data_or_a_network_is_one_line_at_once(monkeypatch, tmp_path):
    """Offline and not cached: said in one line before any model loads, not after a minute of retries."""
    import time

    from gpt_recipes.errors import UserError
    from gpt_recipes.metrics import evaluation

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "")  # restored afterwards: a cached task sets it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    started = time.monotonic()
    with pytest.raises(UserError, match="task hellaswag needs its data set Rowan/hellaswag from the Hugging Face hub, "
                                        "which this machine cannot reach; .*or use the local task docstring_choice"):
        evaluation.resolve_tasks(["hellaswag"])
    assert time.monotonic() - started < 60  # the task index alone takes seconds; no download retries
    cached = tmp_path / "cache" / "Rowan___hellaswag"
    cached.mkdir(parents=True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert evaluation.resolve_tasks(["hellaswag"]) == ["hellaswag"]  # cached: read offline
