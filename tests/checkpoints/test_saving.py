import json
import os
import random
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_recipes.checkpoints import paths, saving
from gpt_recipes.errors import UserError


def _fake(ckpt, step, complete=True):
    tag = ckpt / f"step{step}"
    tag.mkdir(parents=True)
    (tag / "shard.pt").write_bytes(b"x" * 100)
    if complete:
        (tag / paths.TRAINING_INFO).write_text(json.dumps({"step": step}))
    return tag


def test_rotation_keeps_the_newest_complete_ones_and_never_latest(tmp_path):
    for step in (3, 6, 9, 12):
        _fake(tmp_path, step)
    _fake(tmp_path, 15, complete=False)
    (tmp_path / "latest").write_text("step12")
    assert saving.rotate(tmp_path, keep_last=2) == ["step3", "step6"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step12", "step15", "step9"]
    # keep_last=1 when latest is not the newest complete one: latest survives regardless
    (tmp_path / "latest").write_text("step9")
    saving.rotate(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step12", "step15", "step9"]


def test_only_complete_checkpoints_count(tmp_path):
    assert paths.latest_tag(tmp_path) is None
    _fake(tmp_path, 3)
    (tmp_path / "latest").write_text("step3")
    assert paths.latest_tag(tmp_path) == "step3"
    assert paths.is_complete(tmp_path / "step3") and not paths.is_complete(_fake(tmp_path, 6, False))


def test_free_space_is_checked_against_the_last_checkpoint(tmp_path, monkeypatch):
    _fake(tmp_path, 3)
    (tmp_path / "latest").write_text("step3")
    needed = saving.expected_bytes(tmp_path, num_params=10**9)
    assert 100 <= needed < 1000  # measured from the existing checkpoint, not estimated
    assert saving.expected_bytes(tmp_path / "none", num_params=1000) == 16000
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 50, 50))
    with pytest.raises(UserError, match="not enough disk space for a checkpoint"):
        saving.check_free_space(tmp_path, needed)
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10**6, 0, 10**6))
    saving.check_free_space(tmp_path, needed)


class _FakeEngine:
    """Writes one shard per save, as DeepSpeed's engine does into CKPT/TAG/."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        assert save_latest is False
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"new shard")


def _save(out, step, **kwargs):
    return saving.save(_FakeEngine(), out, {"step": step}, rank=0, hf_files=[], training_info={},
                           num_params=10, log=lambda *_: None, **kwargs)


def test_a_save_removes_an_incomplete_folder_of_its_tag_but_never_a_complete_one(tmp_path):
    ckpt = tmp_path / paths.CHECKPOINTS
    _fake(ckpt, 3, complete=False)
    _save(tmp_path, 3)
    assert (ckpt / "step3" / "mp_rank_00_model_states.pt").read_bytes() == b"new shard"
    assert not (ckpt / "step3" / "shard.pt").exists()  # the interrupted save's leftovers are gone
    # A complete step6 from before a roll-back (latest was pointed at step3 and training redone).
    _fake(ckpt, 6)
    _save(tmp_path, 6)
    assert (ckpt / "step6.replaced" / "shard.pt").read_bytes() == b"x" * 100  # kept, renamed aside
    assert (ckpt / "latest").read_text() == "step6" and paths.is_complete(ckpt / "step6")
    assert paths.complete_tags(ckpt) == ["step3", "step6"]  # the renamed one is never rotated away


def test_everything_is_flushed_before_latest_moves(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    tag_dir = _save(tmp_path, 4)
    moved = events.index(("replace", str(tag_dir.parent / "latest")))
    flushed = {path for kind, path in events[:moved] if kind == "fsync"}
    wanted = {str(p) for p in tag_dir.rglob("*")} | {str(tag_dir), str(tag_dir.parent / ".latest.tmp")}
    assert wanted <= flushed, wanted - flushed
    assert ("fsync", str(tag_dir.parent)) in events[moved:]  # and the rename itself


def test_rotation_takes_the_completion_mark_first(tmp_path, monkeypatch):
    for step in (3, 6, 9):
        _fake(tmp_path, step)
    (tmp_path / "latest").write_text("step9")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt  # the deletion is cut short after the mark went

    monkeypatch.setattr(saving.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saving.rotate(tmp_path, keep_last=1)
    assert (tmp_path / "step3").is_dir() and not paths.is_complete(tmp_path / "step3")
    assert paths.complete_tags(tmp_path) == ["step6", "step9"]


def test_rng_states_load_without_unpickling_code(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = tmp_path / "rng.pt"
    torch.save(saving._rng_state(), path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    saving._set_rng_state(saving.load_own(path))  # weights_only=True inside
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_states_of_the_earlier_form_still_load(tmp_path):
    """Written before the states were tensors: a tuple and a NumPy array, which load without code."""
    path = tmp_path / "rng_state_rank0.pt"
    random.seed(9)
    np.random.seed(9)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    expected = (random.random(), np.random.rand())
    saving._set_rng_state(saving.load_own(path))
    assert (random.random(), np.random.rand()) == expected


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_file_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "rng_state_rank0.pt"
    torch.save({"python": Payload()}, path)
    with pytest.raises(UserError, match="holds more than tensors and plain values, so it is not loaded"):
        saving.load_own(path)


def test_a_zero2_weight_gathers_across_rank_partitions():
    """ZeRO-1/2 rank files hold equal consecutive partitions of each group's flat vector; a
    weight may start in one rank's partition and end in another's."""
    from gpt_recipes.checkpoints.consolidate import _Zero2Weight, materialize

    flat = torch.arange(24, dtype=torch.float32)
    partitions = list(flat.chunk(3))  # 3 ranks x 8
    for start, shape in [(0, (2, 3)), (5, (2, 5)), (7, (17,)), (16, (8,))]:
        weight = _Zero2Weight(partitions, start, torch.Size(shape))
        numel = torch.Size(shape).numel()
        assert torch.equal(materialize(weight), flat[start : start + numel].view(shape))
    assert materialize(flat) is flat


def test_the_best_checkpoint_by_validation_loss_is_named_and_never_rotated_away(tmp_path):
    ckpt = tmp_path / paths.CHECKPOINTS
    for step, val_loss in ((2, 5.0), (4, 4.0), (6, None), (8, 4.5), (10, 4.2)):
        state = {"step": step, **({"val_loss": val_loss} if val_loss is not None else {})}
        saving.save(_FakeEngine(), tmp_path, state, rank=0, hf_files=[], training_info={}, num_params=10,
                    keep_last=2, log=lambda *_: None)
    assert paths.best_tag(ckpt) == "step4" and (ckpt / "latest").read_text() == "step10"
    assert paths.complete_tags(ckpt) == ["step4", "step8", "step10"]  # the best survives keep_last 2
    assert paths.resolve_checkpoint(tmp_path, "best") == (ckpt, "step4")
    assert paths.saved_info(ckpt, "step4")["val_loss"] == 4.0
