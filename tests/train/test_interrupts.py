"""Interrupts as users cause them: Ctrl-C in a terminal, a launcher killed on its own, and a second
run started into the folder of a live one. Real 2-rank runs under the deepspeed launcher."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from gpt_recipes.checkpoints.paths import is_complete
from gpt_recipes.launch import REPO, unbuffered_env
from tests.helpers import Background, ds_json, pretrain_args, read_metrics, run_here

pytestmark = pytest.mark.slow

LONG = 2000  # steps (tens of ms each): still training when the test interrupts it


def _args(tmp_path, data, model, out, *extra, steps=LONG):
    return pretrain_args(ds_json(tmp_path, 2, micro=2, fp32=True), data, model, out, steps, "--log_interval", "1",
                         "--eval_interval", "0", "--save_interval", "2", *extra)


def _stopped_at(log: str, why: str, status: int) -> int:
    return _stop_line(log, why, status)[0]


def _stop_line(log: str, why: str, status: int) -> tuple[int, str]:
    """(the step saved, the command the line says to continue with)."""
    found = re.findall(rf"stopped: {why}: saved a checkpoint at step (\d+) and exited with status {status}; "
                       r"continue with: (.+)", log)
    assert len(found) == 1, log[-4000:]  # one save, one message
    return int(found[0][0]), found[0][1].strip()


def test_ctrl_c_saves_once_and_a_second_run_into_the_live_folder_is_refused(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "run"
    # Started as the quickstart starts its run, with --overwrite: the hint must still work as printed.
    run = Background("recipes/pretrain.py", _args(tmp_path, tiny_data, tiny_model, out, "--overwrite"),
                     tmp_path / "run.log")
    try:
        run.wait_for_step(out, 3)  # step2's checkpoint exists, so a --resume passes every other check
        second = run_here("recipes/pretrain.py", _args(tmp_path, tiny_data, tiny_model, out, "--resume"))
        assert second.returncode == 2, second.stderr[-3000:]
        assert re.search(rf"error: --output_dir {re.escape(str(out))} is in use by another run \(pid \d+ on \S+, "
                         r"started [\d-]+ [\d:]+: \S*recipes/pretrain.py", second.stderr), second.stderr[-3000:]
        pids = run.tree()
        os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
        run.wait_all(pids)
        log = run.output()
        step, hint = _stop_line(log, "SIGINT received", 130)
        assert run.shm_buffers() == []
    finally:
        run.kill()
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{step}" and is_complete(ckpt / f"step{step}")
    # A run killed while writing a metrics line leaves half of it: the resume drops it and says so.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "tokens": 12')
    # The command the line printed, run as printed (the test only shortens the run), continues the
    # run: the lock file the stopped run left does not block it.
    # As the tests start it: the launcher as a module of this interpreter, the accelerator named. Run
    # by a shell with none of this environment's scripts on PATH, as from a fresh terminal.
    assert hint.startswith(f"DS_ACCELERATOR=cpu {shlex.quote(sys.executable)} -m deepspeed.launcher.runner "), hint
    assert "--overwrite" not in hint and hint.endswith(" --resume"), hint
    bare = {**unbuffered_env(), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(f"{hint} --max_steps {step + 2}", shell=True, cwd=REPO, env=bare,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Resumed from step {step}" in proc.stdout
    assert "metrics.jsonl: dropped its last line, which was cut short" in proc.stdout
    assert [r["step"] for r in read_metrics(out)[0]] == list(range(1, step + 3))


def test_ctrl_c_in_a_step_longer_than_the_launchers_grace_says_so_and_leaves_nothing(tmp_path, tiny_data,
                                                                                   tiny_model):
    """Rank 0's step after step 3 takes minutes (rank 1 waits for it inside a collective): Ctrl-C
    cannot be honoured with a save before the launcher's 30 s are up, so each rank ends itself
    first (here after GPT_RECIPES_STEP_GRACE = 3 s), rank 0 saying why, and the checkpoint of step
    2 stays the last."""
    out = tmp_path / "run"
    run = Background("recipes/pretrain.py", _args(tmp_path, tiny_data, tiny_model, out), tmp_path / "run.log",
                     GPT_RECIPES_FAULT="slow@3", GPT_RECIPES_STEP_GRACE="3")
    try:
        run.wait_for_step(out, 2)
        time.sleep(3)  # into rank 0's long step
        pids = run.tree()
        os.killpg(run.proc.pid, signal.SIGINT)
        run.wait_all(pids, timeout=25)  # well within the launcher's 30 s
        log = run.output()
        assert ("stopped: SIGINT received during a step that had not ended 3 s later (launchers stop their ranks 30 s "
                "after passing a signal on, and a step cannot be cut short to save): exited without saving; the last "
                "complete checkpoint, step2, is intact; continue with: DS_ACCELERATOR=cpu ") in log, log[-3000:]
        assert "killed, out of memory" not in log and "gpt_recipes/" not in log, log[-3000:]  # none of our tracebacks
        assert run.shm_buffers() == []
    finally:
        run.kill()
    assert (out / "checkpoints" / "latest").read_text() == "step2"


def test_ranks_whose_launcher_is_killed_save_and_exit(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "run"
    run = Background("recipes/pretrain.py", _args(tmp_path, tiny_data, tiny_model, out), tmp_path / "run.log")
    try:
        run.wait_for_step(out, 2)
        pids = run.tree()
        os.kill(run.proc.pid, signal.SIGINT)  # the `deepspeed` launcher alone, not its ranks
        run.wait_all(pids)
        step = _stopped_at(run.output(), "the launcher that started the ranks is gone", 129)
        assert run.shm_buffers() == []
    finally:
        run.kill()
    assert is_complete(out / "checkpoints" / f"step{step}")


def test_a_rank_killed_outright_is_named_at_once(tmp_path, tiny_data, tiny_model):
    """SIGKILL of one rank: the other stops within seconds (not the launcher's 30 s wait), saying which
    rank stopped and which checkpoint is intact; nothing half-written becomes `latest`."""
    import time

    import psutil

    out = tmp_path / "run"
    run = Background("recipes/pretrain.py", _args(tmp_path, tiny_data, tiny_model, out), tmp_path / "run.log")
    try:
        run.wait_for_step(out, 3)
        pids = run.tree()
        rank1 = next(p for p in pids if psutil.Process(p).environ().get("RANK") == "1")
        killed_at = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        run.wait_all(pids, timeout=60)
        took = time.monotonic() - killed_at
        log = run.output()
    finally:
        run.kill()
    found = re.search(r"error: rank 1 stopped while training \(its process is gone: killed, out of memory, or "
                      r"failed; .*\); the other ranks stop too, without saving; the last complete checkpoint, "
                      r"(step\d+), is intact; continue with: .*deepspeed\S* .* --resume", log)
    assert found, log[-3000:]
    assert took < 15, took
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == found.group(1) and is_complete(ckpt / found.group(1))
    assert "Traceback" not in log, log[-3000:]
