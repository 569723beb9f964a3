"""A stopped op build's lock is named in one line before any rank starts; a live build's is not."""

import os
import time

import pytest

from gpt_recipes.parallel.op_builds import STALE_SECONDS, stale_locks
from tests.helpers import ds_json, pretrain_args, run_here


def _lock(root, op: str, age: float):
    folder = root / "py311_cpu" / op
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age
    os.utime(lock, (then, then))
    return lock


def test_only_a_lock_no_build_has_touched_for_long_is_stale(tmp_path):
    old = _lock(tmp_path, "cpu_adam", STALE_SECONDS + 60)
    _lock(tmp_path, "fused_adam", 30)  # a build under way on another rank
    live = _lock(tmp_path, "deepspeed_shm_comm", STALE_SECONDS + 60)
    (live.parent / "shm.o").touch()  # ... whose compiler is still writing
    assert stale_locks(tmp_path) == [old]


def test_a_run_names_the_stale_lock_instead_of_waiting_on_it(tmp_path, monkeypatch, tiny_data, tiny_model):
    lock = _lock(tmp_path / "extensions", "fused_adam", STALE_SECONDS + 120)
    proc = run_here("recipes/pretrain.py", pretrain_args(ds_json(tmp_path, 2, micro=2), tiny_data, tiny_model,
                                                         tmp_path / "run", 2),
                    env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: a stopped build of DeepSpeed's fused_adam op left {lock} (17 minutes old), and this run would wait "
        f"on it forever: remove the folder {lock.parent} (the op is built again on the next run)")
