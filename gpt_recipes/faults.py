"""Fault injection for the reliability tests, switched on by the GPT_RECIPES_FAULT variable.

Never set in normal use. The value is KIND@STEP or KIND@STEP:RANK (default rank 0):
  sigterm@5:1      rank 1 receives SIGTERM after step 5 (a preemption notice)
  die@5:1          rank 1 dies (SIGKILL) after step 5, on a launcher's first attempt only (an
                   elastic launcher's restart, TORCHELASTIC_RESTART_COUNT > 0, runs on)
  kill_in_save@6   rank 0 is SIGKILLed while saving the step-6 checkpoint, after its shards
                   are written and before the checkpoint is complete
  nan@7            rank 0's loss at step 7 is NaN
  export_skew@0    the export's logits are taken to differ from the engine's by 1.0 more
  disk_full@6      rank 0's disk fills while it writes the step-6 checkpoint
  slow@3           rank 0's step after step 3 takes ten minutes (the others wait for it)
  hold@3           rank 0's step after step 3 takes four seconds: time for a test to signal a live run
"""

from __future__ import annotations

import errno
import os
import signal
import time

_SPEC = os.environ.get("GPT_RECIPES_FAULT", "")


def _parse(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    step, _, rank = where.partition(":")
    return kind, int(step), int(rank or 0)


_FAULT = _parse(_SPEC)


def armed(kind: str, step: int, rank: int) -> bool:
    return _FAULT is not None and _FAULT == (kind, step, rank)


def after_step(step: int, rank: int) -> None:
    for kind, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if armed(kind, step, rank):
            os.kill(os.getpid(), sig)
    if armed("die", step, rank) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    if armed("slow", step, rank):
        time.sleep(600)
    if armed("hold", step, rank):
        time.sleep(4)


def during_save(step: int, rank: int) -> None:
    if armed("kill_in_save", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def disk_full(step: int, rank: int) -> None:
    if armed("disk_full", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def poison_loss(loss, step: int, rank: int):
    return loss * float("nan") if armed("nan", step, rank) else loss


def export_skew() -> float:
    return 1.0 if armed("export_skew", 0, 0) else 0.0
