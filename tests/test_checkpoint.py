import json
from collections import namedtuple

import pytest

from gpt_recipes import checkpoint
from gpt_recipes.errors import UserError


def _fake(ckpt, step, complete=True):
    tag = ckpt / f"step{step}"
    tag.mkdir(parents=True)
    (tag / "shard.pt").write_bytes(b"x" * 100)
    if complete:
        (tag / checkpoint.TRAINING_INFO).write_text(json.dumps({"step": step}))
    return tag


def test_rotation_keeps_the_newest_complete_ones_and_never_latest(tmp_path):
    for step in (3, 6, 9, 12):
        _fake(tmp_path, step)
    _fake(tmp_path, 15, complete=False)
    (tmp_path / "latest").write_text("step12")
    assert checkpoint.rotate(tmp_path, keep_last=2) == ["step3", "step6"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step12", "step15", "step9"]
    # keep_last=1 when latest is not the newest complete one: latest survives regardless
    (tmp_path / "latest").write_text("step9")
    checkpoint.rotate(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step12", "step15", "step9"]


def test_only_complete_checkpoints_count(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    _fake(tmp_path, 3)
    (tmp_path / "latest").write_text("step3")
    assert checkpoint.latest_tag(tmp_path) == "step3"
    assert checkpoint.is_complete(tmp_path / "step3") and not checkpoint.is_complete(_fake(tmp_path, 6, False))


def test_free_space_is_checked_against_the_last_checkpoint(tmp_path, monkeypatch):
    _fake(tmp_path, 3)
    (tmp_path / "latest").write_text("step3")
    needed = checkpoint.expected_bytes(tmp_path, num_params=10**9)
    assert 100 <= needed < 1000  # measured from the existing checkpoint, not estimated
    assert checkpoint.expected_bytes(tmp_path / "none", num_params=1000) == 16000
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 50, 50))
    with pytest.raises(UserError, match="not enough disk space for a checkpoint"):
        checkpoint.check_free_space(tmp_path, needed)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**6, 0, 10**6))
    checkpoint.check_free_space(tmp_path, needed)
