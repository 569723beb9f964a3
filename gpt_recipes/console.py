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
import shlex
import sys
import threading
import time
from typing import Iterator

import psutil

VERBOSE = os.environ.get("GPT_RECIPES_VERBOSE", "") not in ("", "0")
# DeepSpeed warnings with nothing to act on in these recipes: the CPU accelerator is chosen on
# purpose here, the scheduler is asked for its rate before the first step by DeepSpeed itself,
# and no model-parallel unit is what a data-parallel run means.
CHATTER = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started",
           "MPU is not provided")
# Python warnings of the libraries, each about an internal choice the recipes made on purpose:
# peft notes the base's path it records (the recipes record and check the base themselves),
# transformers' gradient-checkpointing flag is read by the libraries, not by these recipes.
WARNINGS = (r"The PEFT config's `base_model_name_or_path` was renamed", r"`is_gradient_checkpointing` is deprecated",
            # DeepSpeed's pipeline engine passes activations between stages with broadcasts that
            # autograd sees; it sends their gradients back itself
            r"c10d::broadcast_: an autograd kernel was not registered")


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return VERBOSE or not record.getMessage().startswith(CHATTER)


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal, or when verbose."""
    return VERBOSE or sys.stderr.isatty()


def install() -> None:
    import warnings

    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropChatter) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_DropChatter())
    if not VERBOSE:
        for message in WARNINGS:
            warnings.filterwarnings("ignore", message=message)
    if not progress_bars():  # tqdm's, datasets' and the hub's (transformers' loading bars follow the hub's); the
        # tokenizers library's own bar asks progress_bars()
        for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")
        if "transformers" in sys.modules:  # imported before this ran: it read the variables already
            sys.modules["transformers"].utils.logging.disable_progress_bar()


LINE_INTERVAL = 30.0  # seconds: in a log file, a long phase says where it is at least this often


class Progress:
    """A bar on a terminal; in a log file a line at most every LINE_INTERVAL seconds (the count so
    far, its share and the time), so a long phase never looks stopped. `show`: this rank speaks."""

    def __init__(self, total: int, desc: str, unit: str, show: bool = True):
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.show, self.done = total, desc, unit, show, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) if show and progress_bars() else None
        self.started = self.said = time.monotonic()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
            return
        self.done += n
        now = time.monotonic()
        if self.show and now - self.said >= LINE_INTERVAL:
            self.said = now
            print(f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}s ({self.done / max(self.total, 1):.0%}, "
                  f"{now - self.started:.0f} s)", flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def heartbeat(what: str, show: bool = True) -> Iterator[None]:
    """Off a terminal, a line every LINE_INTERVAL seconds while a phase with nothing to count runs
    (consolidating a checkpoint, an evaluation): `what: still running (N s)`."""
    if not show or progress_bars():
        yield
        return
    stop, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(LINE_INTERVAL):
            print(f"{what}: still running ({time.monotonic() - start:.0f} s)", flush=True)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    try:
        yield
    finally:
        stop.set()


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


# Command lines of the launchers that start ranks: deepspeed's runner and its per-node
# launch.py, torchrun, accelerate launch.
LAUNCHER_MARKERS = ("bin/deepspeed", "deepspeed.launcher.launch", "deepspeed.launcher.runner", "bin/torchrun",
                    "torch.distributed.run", "accelerate.commands.launch",
                    "bin/accelerate")


def launcher_processes() -> list[psutil.Process]:
    """The chain of launcher processes directly above this rank (none for a bare `python` run)."""
    found = []
    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1 and any(m in " ".join(proc.cmdline()) for m in LAUNCHER_MARKERS):
            found.append(proc)
            proc = proc.parent()
    except psutil.Error:
        pass
    return found


def with_own_scripts(path: str | None) -> str:
    """PATH with this interpreter's scripts folder first (a venv's bin/: its deepspeed, torchrun and
    ninja), so a run started as venv/bin/python, with nothing activated, finds its own tools."""
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    parts = (path or "").split(os.pathsep) if path else []
    return os.pathsep.join([scripts, *(p for p in parts if p != scripts)])


def resume_command() -> str:
    """The command that continues this run, as the user typed it: the outermost launcher's command
    line (or this `python` one), without --overwrite, with --resume. Hints print it, so that
    following them works (a command that carries --overwrite would be refused with --resume)."""
    chain = launcher_processes()
    try:
        argv = chain[-1].cmdline() if chain else [sys.executable, *sys.argv]
    except psutil.Error:
        argv = [sys.executable, *sys.argv]
    if len(argv) > 1 and "python" in os.path.basename(argv[0]) and \
            os.path.basename(argv[1]) in ("deepspeed", "torchrun", "accelerate"):
        argv = argv[1:]  # a launcher script run by its shebang, as the shell shows it
    if not (len(argv) > 2 and argv[1] == "-m"):  # `python -m launcher` keeps its interpreter: its environment
        argv = [os.path.basename(argv[0]), *argv[1:]]
    kept = [a for a in argv if a not in ("--overwrite", "--resume") and not a.startswith("--local_rank")]
    # The accelerator the run was started with (the Makefile names DeepSpeed's CPU one).
    accelerator = [f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}"] if os.environ.get("DS_ACCELERATOR") else []
    return " ".join([*accelerator, shlex.join([*kept, "--resume"])])
