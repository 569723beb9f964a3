"""What a run prints: the recipes' own lines, not DeepSpeed's known chatter, and progress bars
only on a terminal (a log file gets no 0%/100% pairs). GPT_RECIPES_VERBOSE=1 shows everything.

`install` runs when the package is imported, before DeepSpeed is: DeepSpeed's logger keeps a
filter attached before its own set-up, and tqdm reads TQDM_DISABLE when a bar is made.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Iterator

VERBOSE = os.environ.get("GPT_RECIPES_VERBOSE", "") not in ("", "0")
# DeepSpeed warnings with nothing to act on in these recipes: the CPU accelerator is chosen on
# purpose here, and the scheduler is asked for its rate before the first step by DeepSpeed itself.
CHATTER = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return VERBOSE or not record.getMessage().startswith(CHATTER)


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal, or when verbose."""
    return VERBOSE or sys.stderr.isatty()


def install() -> None:
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropChatter) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropChatter())
    if not progress_bars():  # tqdm's; the tokenizers library's own bar asks progress_bars()
        os.environ.setdefault("TQDM_DISABLE", "1")


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Keep back what a library prints (not logs) inside the block, e.g. DeepSpeed's "built
    successfully" and its checkpoint reader's notes; shown if the block fails, or when verbose."""
    if VERBOSE:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stdout.write(held.getvalue())
        raise
