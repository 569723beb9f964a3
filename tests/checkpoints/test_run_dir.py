"""What --resume and --overwrite may do to an output folder: never lose a checkpoint or a user's files."""

import json
import subprocess
import sys

import pytest

from gpt_recipes.checkpoints.paths import CHECKPOINTS, LATEST, LOCK, RUN_CONFIG, TRAINING_INFO
from gpt_recipes.checkpoints.run_dir import OutputPlan, plan_output_dir, remove_previous_run
from gpt_recipes.errors import UserError
from gpt_recipes.folders import PROBE_PREFIX


def _run_folder(path, steps=(3, 6), latest="step6", incomplete=()):
    """A run folder as the recipes leave it: config.json, metrics.jsonl, checkpoints/step<N>/, latest."""
    ckpt = path / CHECKPOINTS
    for step in (*steps, *incomplete):
        (ckpt / f"step{step}").mkdir(parents=True)
        (ckpt / f"step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in steps:
            (ckpt / f"step{step}" / TRAINING_INFO).write_text(json.dumps({"step": step}))
    if latest:
        (ckpt / LATEST).write_text(latest)
    (path / RUN_CONFIG).write_text(json.dumps({"recipe": "pretrain"}))
    (path / "metrics.jsonl").write_text('{"step": 6, "loss": 1.0}\n')
    return path


def test_resume_takes_latest(tmp_path):
    assert plan_output_dir(_run_folder(tmp_path / "run"), resume=True, overwrite=False) == OutputPlan("step6")


def test_resume_rolled_back_by_the_user_keeps_their_choice(tmp_path):
    assert plan_output_dir(_run_folder(tmp_path / "run", latest="step3"), True, False).resume_tag == "step3"


@pytest.mark.parametrize("latest, why", [(None, "there is no 'latest' file"),
                                         ("step9", "'latest' names step9, which is missing or incomplete")])
def test_resume_without_a_usable_latest_takes_the_newest_complete_checkpoint(tmp_path, latest, why):
    out = _run_folder(tmp_path / "run", latest=latest, incomplete=(9,))
    plan = plan_output_dir(out, resume=True, overwrite=False)
    assert plan.resume_tag == "step6"
    assert plan.note == f"{why}: resuming from the newest complete checkpoint, step6"


def test_resume_with_no_complete_checkpoint_is_refused_and_touches_nothing(tmp_path):
    out = _run_folder(tmp_path / "run", steps=(), latest=None, incomplete=(3,))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="holds no complete checkpoint to continue from; pass --overwrite"):
        plan_output_dir(out, resume=True, overwrite=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_resume_into_a_folder_that_is_not_a_run_is_refused(tmp_path):
    export = tmp_path / "exported"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # a model folder, not a run
    with pytest.raises(UserError, match="is not a run folder written by these recipes"):
        plan_output_dir(export, resume=True, overwrite=False)


def test_resume_of_a_new_folder_starts_at_step_zero(tmp_path):
    plan = plan_output_dir(tmp_path / "new", resume=True, overwrite=False)
    assert plan.resume_tag is None and "nothing to resume" in plan.note


def test_overwrite_replaces_only_a_run_folder(tmp_path):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.safetensors").write_text("someone's model")
    with pytest.raises(UserError, match="--overwrite replaces only a run folder written by these recipes"):
        plan_output_dir(mine, resume=False, overwrite=True)
    assert plan_output_dir(_run_folder(tmp_path / "run"), resume=False, overwrite=True) == OutputPlan(replace=True)


def test_overwrite_removes_the_previous_runs_outputs_and_nothing_else(tmp_path):
    out = _run_folder(tmp_path / "run")
    (out / "notes.txt").write_text("keep me")
    assert sorted(remove_previous_run(out)) == sorted([CHECKPOINTS, "metrics.jsonl", RUN_CONFIG])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(UserError, match="pass one of them"):
        plan_output_dir(_run_folder(tmp_path / "run"), resume=True, overwrite=True)


def test_non_empty_folder_without_a_flag_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not empty; pass --resume to continue it"):
        plan_output_dir(_run_folder(tmp_path / "run"), resume=False, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        plan_output_dir(tmp_path / "file", resume=False, overwrite=False)


def test_resume_from_a_named_checkpoint(tmp_path):
    out = _run_folder(tmp_path / "run", steps=(3, 6, 9), latest="step9")
    assert plan_output_dir(out, resume=False, overwrite=False, resume_from="step3").resume_tag == "step3"
    assert plan_output_dir(out, False, False, resume_from=str(out / "checkpoints" / "step6")).resume_tag == "step6"
    with pytest.raises(UserError, match="holds no complete checkpoint 'step4' \\(complete: step3, step6, step9\\)"):
        plan_output_dir(out, False, False, resume_from="step4")
    other = _run_folder(tmp_path / "other", steps=(3,), latest="step3")
    with pytest.raises(UserError, match="is not a checkpoint of --output_dir"):
        plan_output_dir(out, False, False, resume_from=str(other / "checkpoints" / "step3"))
    with pytest.raises(UserError, match="--resume_from continues the run in --output_dir and --overwrite replaces"):
        plan_output_dir(out, False, True, resume_from="step3")


def test_another_ranks_lock_and_write_probe_are_not_content(tmp_path):
    """Ranks check the folder at the same moment as rank 0 locks it and each probes it for writing."""
    out = tmp_path / "new"
    out.mkdir()
    (out / LOCK).write_text("pid 1")
    (out / (PROBE_PREFIX + "abc")).mkdir()
    assert plan_output_dir(out, resume=False, overwrite=False) == OutputPlan()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="is not empty"):
        plan_output_dir(out, resume=False, overwrite=False)


def test_a_run_stopped_before_it_wrote_anything_leaves_no_folder(tmp_path):
    script = (f"from pathlib import Path\nfrom gpt_recipes.checkpoints.run_dir import RunLock\n"
              f"RunLock(Path({str(tmp_path / 'a' / 'b' / 'run')!r}))\n"
              f"RunLock(Path({str(tmp_path / 'kept')!r}))\n"
              f"(Path({str(tmp_path / 'kept')!r}) / 'metrics.jsonl').write_text('{{}}')\n")
    (tmp_path / "kept").mkdir()
    subprocess.run([sys.executable, "-c", script], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK, "metrics.jsonl"]
