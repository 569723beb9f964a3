import json

import pytest

from gpt_recipes.checkpoints import paths
from gpt_recipes.errors import UserError


def _checkpoint(ckpt_dir, step, complete=True, zero3=False):
    tag_dir = ckpt_dir / paths.tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / f"{'zero_pp_rank_0_' if zero3 else ''}mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (tag_dir / paths.TRAINING_INFO).write_text(json.dumps({"step": step}))
    return tag_dir


def test_a_checkpoint_is_found_from_the_run_its_folder_or_the_tag(tmp_path):
    ckpt = paths.checkpoints_dir(tmp_path)
    _checkpoint(ckpt, 3)
    tag6 = _checkpoint(ckpt, 6, zero3=True)
    paths.write_latest(ckpt, "step6")
    assert paths.resolve_checkpoint(tmp_path) == (ckpt, "step6")
    assert paths.resolve_checkpoint(ckpt, "step3") == (ckpt, "step3")
    assert paths.resolve_checkpoint(tag6) == (ckpt, "step6")
    with pytest.raises(UserError, match="holds no checkpoint tagged 'step9' \\(available: step3, step6\\)"):
        paths.resolve_checkpoint(tmp_path, "step9")
    (ckpt / paths.LATEST).unlink()
    with pytest.raises(UserError, match="has no 'latest' tag; pass --tag \\(one of: step3, step6\\)"):
        paths.resolve_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a DeepSpeed checkpoint folder"):
        paths.resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        paths.resolve_checkpoint(tmp_path / "nowhere")


def test_resume_takes_latest_or_the_newest_complete_checkpoint_and_says_why(tmp_path):
    assert paths.resume_tag(tmp_path) == (None, None)
    _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 6)
    _checkpoint(tmp_path, 9, complete=False)  # a save cut short
    assert paths.resume_tag(tmp_path) == ("step6", "there is no 'latest' file: resuming from the newest complete "
                                                    "checkpoint, step6")
    paths.write_latest(tmp_path, "step3")  # rolled back by hand: latest wins
    assert paths.resume_tag(tmp_path) == ("step3", None)
    paths.write_latest(tmp_path, "step9")
    tag, note = paths.resume_tag(tmp_path)
    assert tag == "step6" and note.startswith("'latest' names step9, which is missing or incomplete")
    assert paths.recorded_info(tmp_path / "step9") == {} and paths.saved_info(tmp_path, "step6") == {"step": 6}


def test_latest_holding_bytes_that_are_no_tag_name(tmp_path):
    """A `latest` damaged to non-text bytes is not a traceback: the newest complete checkpoint is
    resumed, and the note says why."""
    for step in (3, 6):
        (tmp_path / f"step{step}").mkdir()
        (tmp_path / f"step{step}" / "training.json").write_text(f'{{"step": {step}}}')
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00step6")
    assert paths.latest_tag(tmp_path) is None
    assert paths.resume_tag(tmp_path) == ("step6", "'latest' holds no tag name (damaged): resuming from the newest "
                                                   "complete checkpoint, step6")
