"""DeepSpeed's JIT-built ops (CPU Adam, fused Adam, the shared-memory collectives): torch builds each
once into its extensions folder, holding a `lock` file while it does. A build stopped midway (a run
killed during its first minutes) leaves the lock behind, and every later run waits on it forever
without a word; this names it in one line before any rank starts instead."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gpt_recipes.errors import UserError

# Building one op takes about a minute on 2 CPU cores; a lock older than this, in a folder nothing
# has written to for as long, belongs to no live build.
STALE_SECONDS = 15 * 60


def extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def stale_locks(root: Path, now: float | None = None) -> list[Path]:
    """The locks under ROOT/<python and device>/<op>/ that no build has touched for STALE_SECONDS."""
    now = time.time() if now is None else now
    stale = []
    for lock in sorted(root.glob("*/*/lock")):
        try:
            newest = max(p.stat().st_mtime for p in lock.parent.rglob("*"))
        except (OSError, ValueError):  # gone meanwhile: its build just ended
            continue
        if now - newest > STALE_SECONDS:
            stale.append(lock)
    return stale


def check_op_builds() -> None:
    """Stop with one line if a stopped build's lock would make this run wait forever."""
    stale = stale_locks(extensions_root())
    if stale:
        lock = stale[0]
        minutes = int((time.time() - lock.stat().st_mtime) // 60)
        raise UserError(f"a stopped build of DeepSpeed's {lock.parent.name} op left {lock} ({minutes} minutes old), "
                        f"and this run would wait on it forever: remove the folder {lock.parent} (the op is built "
                        "again on the next run)")
