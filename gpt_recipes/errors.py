"""Errors a run ends with on purpose, each printed as a single line with its own exit status."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import sys
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

# Exit statuses: bad input 2, diverged training 3, an export that does not reproduce the
# trained model 4; stopped by a signal 128 + its number (143 for SIGTERM, 130 for SIGINT)
# after saving a checkpoint. Crashes stay 1.
USER_ERROR_EXIT = 2
DIVERGED_EXIT = 3
EXPORT_MISMATCH_EXIT = 4


class RecipeExit(Exception):
    """A planned end of the run: printed as `error: <message>` and exits with `exit_code`."""

    exit_code = 1
    prefix = "error"


class UserError(RecipeExit):
    """Bad input the user can fix: a missing file, an inconsistent config, a mismatch."""

    exit_code = USER_ERROR_EXIT


class Stopped(RecipeExit):
    """A command stopped by SIGTERM or SIGINT (Ctrl-C) between two of its own steps; exits with
    128 + the signal number, as schedulers expect."""

    prefix = "stopped"

    def __init__(self, signum: int, what: str):
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: {what}")


@contextlib.contextmanager
def stop_on_signals(what: str) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Stopped (saying `what`): the block's own clean-up
    (temporary folders, locks) runs, and the command ends with one line instead of being killed."""

    def stop(signum, frame):
        raise Stopped(signum, what)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Finished(RecipeExit):
    """Nothing left to do (a requeued job whose run has already finished): said, and exit 0."""

    exit_code = 0
    prefix = "done"


class RankError(UserError):
    """A user-fixable failure of one rank alone (its disk filled): printed by the rank that met it,
    where a UserError, which every rank meets alike, is printed by rank 0 only."""


class DivergedError(RecipeExit):
    """The loss became NaN or infinite and stayed so; the last good checkpoint is kept."""

    exit_code = DIVERGED_EXIT


class ExportMismatch(RecipeExit):
    """The exported folder does not reproduce the trained engine; the checkpoint is kept."""

    exit_code = EXPORT_MISMATCH_EXIT


def cli_entry(main: Callable[[], T]) -> Callable[[], T]:
    """Run `main`, turning a RecipeExit into one line on stderr and its exit status.

    Under a multi-rank launcher every rank sees the same inputs and raises the same
    error, so only rank 0 prints it; the others exit quietly with the same status.
    """

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except RecipeExit as err:
            if _rank() == 0 or isinstance(err, RankError):
                print(f"{err.prefix}: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
        finally:
            # At exit Python collects the cyclic objects torch, transformers and DeepSpeed leave,
            # about 1.3 s per process here; the command's files are written and closed by now
            # (atexit functions still run), so the last collection is skipped.
            gc.freeze()

    return wrapper


# The rank variables of the launchers parallel/launchers.py reads, in its order (srun's only in a job
# step); tests/parallel/test_launchers.py checks that the two agree.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _rank() -> int:
    """This process's rank, whichever launcher started it (srun and mpirun name it their own way)."""
    keys = RANK_VARIABLES + (("SLURM_PROCID",) if "SLURM_STEP_ID" in os.environ else ())
    value = next((os.environ[key] for key in keys if key in os.environ), "0")
    return int(value) if value.isdigit() else 0


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def root_line(err: BaseException) -> str:
    """The first line of the innermost cause: libraries that wrap errors (datasets: "An error
    occurred while generating the dataset") keep what went wrong in the cause."""
    while err.__cause__ is not None:
        err = err.__cause__
    return first_line(err)
