"""One exception type for problems with the user's input, printed as a single line."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

# Exit status for bad input, distinct from crashes (1) and signals (128+n).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix: a missing file, an inconsistent config, a mismatch."""


def cli_entry(main: Callable[[], T]) -> Callable[[], T]:
    """Run `main`, turning a UserError into one line on stderr and a non-zero exit.

    Under a multi-rank launcher every rank sees the same inputs and raises the same
    error, so only rank 0 prints it; the others exit quietly with the same status.
    """

    @functools.wraps(main)
    def wrapper() -> T:
        try:
            return main()
        except UserError as err:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT)

    return wrapper


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in a UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
