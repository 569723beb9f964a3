"""The run's output folder: what a run may do to it, where a resume starts, the resolved configuration.

A run folder is one these recipes wrote: its config.json records the recipe, or it holds
checkpoints/. --resume continues only a run folder, from its newest usable checkpoint;
--overwrite replaces only a run folder's own outputs (RUN_OUTPUTS), and only once every
check has passed, so a fresh run never mixes with the one before it; any other non-empty
folder is refused.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_recipes.checkpoints.paths import (
    CHECKPOINTS,
    LOCK,
    RUN_CONFIG,
    RUN_OUTPUTS,
    checkpoints_dir,
    complete_tags,
    resume_tag,
)
from gpt_recipes.errors import UserError
from gpt_recipes.folders import PROBE_PREFIX, check_creatable


@dataclass(frozen=True)
class OutputPlan:
    """What this run does with its output folder."""

    resume_tag: str | None = None  # the checkpoint to continue from
    note: str | None = None  # said before training, when the resume point needs explaining
    replace: bool = False  # a previous run's outputs are removed before the first write


def is_run_folder(out_dir: Path) -> bool:
    try:
        record = json.loads((out_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        record = None
    return (isinstance(record, dict) and "recipe" in record) or checkpoints_dir(out_dir).is_dir()


def check_output_path(path: str | Path, flag: str, avoid: dict[str, Any] | None = None, file: bool = False,
                      outputs: dict[str, Any] | None = None) -> Path:
    """The one guard for every output of every tool and recipe, checked before any work: `path` is
    not one of the inputs in `avoid` ({flag or name: path}), nor inside one, nor holds one; nor
    one of the command's other `outputs`, nor inside or around one; not inside a run's
    checkpoints folder, whose saves and rotation delete what they do not know; a file where a
    file is to be written (`file`), a folder otherwise; and writable."""
    path = Path(path)
    if file and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the name of a file to write")
    if not file and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    where = path.resolve()
    for named, what, fix in ((avoid, "an input", "so the input stays as it is"),
                             (outputs, "another output of this command", "so neither overwrites the other")):
        for name, other in (named or {}).items():
            for item in ([other] if isinstance(other, (str, Path)) else other or []):
                there = Path(item).resolve()
                if where == there:
                    raise UserError(f"{flag} {path} is also {name}, {what}; give it a path of its own, {fix}")
                if there in where.parents:
                    raise UserError(f"{flag} {path} is inside {name} {item}, {what}; write outside it, {fix}")
                if where in there.parents:
                    raise UserError(f"{flag} {path} holds {name} {item}, {what}; write elsewhere, {fix}")
    for folder in (where, *where.parents):
        if folder.name == CHECKPOINTS and is_run_folder(folder.parent):
            raise UserError(f"{flag} {path} is inside the checkpoints of the run {folder.parent}, which its saves "
                            "and rotation manage (and delete); write it outside the checkpoints folder")
    check_creatable(path, flag)
    return path


def plan_output_dir(out_dir: Path, resume: bool, overwrite: bool, resume_from: str | None = None) -> OutputPlan:
    """Check that the run may write to `out_dir`, and decide where it starts (`resume_from`: a tag or
    tag folder of its checkpoints, instead of `latest`)."""
    if resume_from:
        if overwrite:
            raise UserError("--resume_from continues the run in --output_dir and --overwrite replaces it: pass one "
                            "of them")
        return OutputPlan(resume_tag=_chosen_checkpoint(out_dir, resume_from),
                          note=f"--resume_from: continuing from {Path(resume_from).name}")
    if resume and overwrite:
        raise UserError("--resume continues the run in --output_dir and --overwrite replaces it: pass one of them")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} exists and is not a folder")
    check_creatable(out_dir, "--output_dir")
    if not out_dir.exists() or all(_housekeeping(p) for p in out_dir.iterdir()):
        return OutputPlan(note=f"--resume: nothing to resume in {out_dir} yet, starting at step 0" if resume else None)
    if resume:
        if not is_run_folder(out_dir):
            raise UserError(f"--resume: {out_dir} is not a run folder written by these recipes (no run config.json, "
                            "no checkpoints/); give the run's own --output_dir")
        tag, note = resume_tag(checkpoints_dir(out_dir))
        if tag is None:
            raise UserError(f"--resume: {out_dir} holds no complete checkpoint to continue from; pass --overwrite to "
                            "start a fresh run there (replacing that run's outputs), or choose another folder")
        return OutputPlan(resume_tag=tag, note=note)
    if not overwrite:
        raise UserError(f"--output_dir {out_dir} is not empty; pass --resume to continue it, --overwrite to start "
                        "a fresh run there, or choose another folder")
    if not is_run_folder(out_dir):
        raise UserError(f"--overwrite replaces only a run folder written by these recipes, and {out_dir} is not one; "
                        "choose another --output_dir")
    return OutputPlan(replace=True)


def _housekeeping(path: Path) -> bool:
    """The lock, or another rank's write probe: what a folder holds while ranks start, not a run."""
    return path.name == LOCK or path.name.startswith(PROBE_PREFIX)


def _chosen_checkpoint(out_dir: Path, resume_from: str) -> str:
    ckpt_dir = checkpoints_dir(out_dir)
    given = Path(resume_from)
    # A path names a folder, and it must be one of this run's checkpoints, existing or not: a missing
    # folder elsewhere is not this run's checkpoint of the same name.
    if (given.is_dir() or len(given.parts) > 1) and given.resolve().parent != ckpt_dir.resolve():
        raise UserError(f"--resume_from {resume_from} is not a checkpoint of --output_dir {out_dir} (its checkpoints are "
                        f"in {ckpt_dir}); give one of their tags, or the run's own --output_dir")
    tag = given.name
    complete = complete_tags(ckpt_dir)
    if tag not in complete:
        raise UserError(f"--resume_from {resume_from}: {ckpt_dir} holds no complete checkpoint {tag!r} (complete: "
                        f"{', '.join(complete) or 'none'})")
    return tag


class RunLock:
    """An exclusive lock on OUT/.run.lock, held by rank 0 for the life of the run, so that a second
    run (a --resume from another shell, say) cannot write into the same folder at the same time.

    It is an flock: the kernel drops it when the process ends, however it ends, so a lock file
    left by a dead run never blocks the next one. The file says who holds it.
    """

    def __init__(self, out_dir: Path):
        path = out_dir / LOCK
        # The first folder this lock creates: a run that stops before writing anything leaves no trace.
        created = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a+")
        except OSError as err:
            raise UserError(f"cannot write to --output_dir {out_dir}: {err.strerror}")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(f"--output_dir {out_dir} is in use by another run ({holder}); wait for it to end, or "
                            "stop it (Ctrl-C saves a checkpoint), or choose another folder")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
        self._file.flush()
        # Absolute: the process may change folder before it exits. Registered without the lock
        # itself, so that dropping the lock still releases it.
        atexit.register(_discard_if_unused, path.absolute(), created.absolute() if created else None)

    def release(self) -> None:
        self._file.close()


def _discard_if_unused(lock: Path, created: Path | None) -> None:
    """At exit: the folders a lock created, when the run wrote nothing else into them."""
    try:
        if created is None or not all(_housekeeping(p) for p in lock.parent.iterdir()):
            return
        lock.unlink(missing_ok=True)
        for folder in [lock.parent, *lock.parent.parents]:
            folder.rmdir()
            if folder == created:
                return
    except OSError:  # gone already, or another process wrote there meanwhile: leave it
        return


def remove_previous_run(out_dir: Path) -> list[str]:
    """Delete a previous run's outputs from `out_dir` (rank 0, once every check has passed)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_run_config(out_dir: Path, record: dict[str, Any]) -> None:
    import deepspeed
    import torch
    import transformers

    record = {
        **record,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / RUN_CONFIG).write_text(json.dumps(record, indent=2, default=str) + "\n")
