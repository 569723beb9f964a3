"""Folders the tools write whole (exports, data, tokenizers): marked, written aside, replaced safely.

A tool writes its folder under a temporary name next to the destination and renames it into
place only when complete. It leaves a marker file saying what wrote it, and replaces an
existing folder only when the user asks (--overwrite) *and* the marker says this
project wrote a folder of that kind there: a folder of anyone else's is never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from gpt_recipes.errors import UserError

MARKER = ".gpt-recipes.json"


def mark(folder: Path, kind: str, **info: Any) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "gpt-recipes", "kind": kind, **info}, indent=2,
                                            default=str) + "\n")


def written_here(folder: Path, kind: str) -> bool:
    """Whether `folder` holds a marker saying this project wrote it as a `kind` folder."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("written_by") == "gpt-recipes" and info.get("kind") == kind


def is_empty(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def check_replaceable(folder: Path, kind: str, replace: bool, flag: str, owned: bool | None = None) -> None:
    """Refuse to write `folder` unless it is absent or empty, or `replace` was asked for and it
    is a `kind` folder this project wrote (`owned` overrides the marker check)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output {folder} exists and is not a folder")
    if is_empty(folder):
        check_creatable(folder, "output folder")
        return
    if not replace:
        raise UserError(f"output folder {folder} is not empty; choose another or pass {flag} to replace it")
    if not (owned if owned is not None else written_here(folder, kind)):
        raise UserError(f"output folder {folder} is not a {kind} folder written by these tools, so {flag} will not "
                        "replace it; choose another folder, or move it away yourself")


# The short-lived folder check_creatable makes: another rank checking the same folder at the
# same moment must not take it for content.
PROBE_PREFIX = ".gpt-recipes-probe-"


def check_creatable(path: Path, what: str) -> None:
    """That `path` (a file or folder to be written) can be written: an existing folder takes new
    files, and otherwise its nearest existing ancestor is a folder that takes a new folder. Tried
    for real (a folder made and removed): permission bits say nothing to root, nor of read-only
    mounts, /proc or full quotas."""
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {what} {path}: {probe} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=probe))
    except OSError as err:
        where = "" if probe == path else f": {probe} does not take new files"
        raise UserError(f"cannot write {what} {path}{where} ({err.strerror})")


def temporary_beside(folder: Path) -> Path:
    """An empty folder next to `folder`, to write into before renaming it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)  # mkdtemp makes the folder private (0700); give it a plain mkdir's permissions
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def written_aside(folder: Path, kind: str, replace: bool = False, flag: str = "--overwrite",
                  owned: bool | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `folder` to write into; when the block ends, mark it (unless the
    block marked it with more facts) and rename it into place. On any error, or an interrupt, the
    temporary folder is removed and `folder` stays as it was.

    One writer at a time: a lock beside `folder` refuses a second one in one line. Under the lock,
    `folder` is checked again (check_replaceable with `replace`, `flag` and `owned`), and what a
    writer killed outright left beside it (its temporary folders) is swept away."""
    with _writer_lock(folder):
        check_replaceable(folder, kind, replace, flag, owned)
        for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temporary_beside(folder)
        try:
            yield tmp
            if not (tmp / MARKER).is_file():
                mark(tmp, kind)
            plain_permissions(tmp)
            move_into_place(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def plain_permissions(folder: Path) -> None:
    """Files as a plain `open` makes them under the user's umask (0644 under 022): safetensors writes
    its files owner-only (0600), which a teammate on a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on .NAME.lock beside `folder` (an flock: the kernel drops it when the process
    ends, however it ends); the file goes when the writer is done."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"output folder {folder} is being written by another command ({holder}); wait for it "
                            "to end, or write to another folder")
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break  # the lock file still at its path: not one a finishing writer just removed
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def is_disk_failure(err: BaseException) -> bool:
    """A write that failed for want of disk: the OSError itself, or a library's own error about it
    (torch.save's C++ stream, safetensors' writer); a collective's error is not one."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG):
        return True
    text = str(err)
    return any(sign in text for sign in ("PytorchStreamWriter", "file write failed", "No space left on device",
                                         "Disk quota exceeded", "Read-only file system", "File too large"))


@contextlib.contextmanager
def disk_failures_said(folder: Path) -> Iterator[None]:
    """A full disk while writing `folder` (written aside) as one line: nothing of it was written."""
    from gpt_recipes.errors import first_line

    try:
        yield
    except Exception as err:
        if not is_disk_failure(err):
            raise
        raise UserError(f"writing {folder} failed: {first_line(err)} (is the disk full?); nothing was written there "
                        "and nothing of yours changed: free some space and run the command again") from err


def move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the complete `tmp` to `folder`; an existing `folder` (already checked replaceable)
    is renamed aside first and deleted last, so neither is ever half there."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
