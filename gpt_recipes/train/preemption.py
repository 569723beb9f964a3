"""Turn an interrupt, a preemption notice or a lost launcher into a checkpoint and a clean exit.

Cluster schedulers send SIGTERM before they preempt a job, often to one process only (Slurm sends
the signal its batch script asks for, SIGUSR1 in launch/slurm/, before a time limit); Ctrl-C
in a terminal sends SIGINT to the launcher and every rank at once, and the launcher then
forwards SIGTERM to each rank as well. Each rank records the first signal; after every step
the ranks agree whether any of them received one, and all of them save and exit together
with status 128 + the signal number. The agreement is a max all-reduce of one integer on a
CPU process group, so it never waits on the GPU, and it is asynchronous: the reduction
started after step k is read after step k + 1, so it costs no round trip per step, and a
signal is honoured within one step.

Signals that reach a rank within FORWARD_WINDOW seconds of its first are the same interrupt
passed on by a launcher; a signal after that is the user insisting, and stops the rank at
once, without saving. So does a signal that arrives while torch.compile is compiling: a compile
can take longer than the launcher waits before it kills the ranks (DeepSpeed's: 30 s), and a
step cannot be cut short to save, so the rank ends at once, its last checkpoint intact. A rank whose launcher process is gone (killed on its own, leaving the
ranks with no parent to report to) stops the same way as on SIGHUP: save, then exit 129. A
rank that dies (PeerWatch) ends the others at once, with a line that names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import psutil
import torch
import torch.distributed as dist

from gpt_recipes.console import launcher_processes, resume_command

# SIGUSR1: Slurm's warning before a time limit or preemption (sbatch --signal=USR1@SECONDS).
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FORWARD_WINDOW = 2.0  # seconds
LAUNCHER_GONE = signal.SIGHUP
LAUNCHER_CHECK_INTERVAL = 1.0  # seconds
class _PipeSafe:
    """A text stream whose writes are dropped, instead of raising, once its reader is gone."""

    def __init__(self, stream):
        self._stream = stream
        self._closed = isinstance(stream, _PipeSafe) and stream._closed

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except OSError:  # BrokenPipeError, or EPIPE from a flush inside
                self._closed = True
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except OSError:
                self._closed = True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _alive(proc: psutil.Process) -> bool:
    # A launcher that died stays a zombie until its own parent reaps it: that is gone too.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


COMPILING = "while torch.compile was compiling (a step cannot be cut short to save)"


def compiling(frame) -> bool:
    """Whether the code a signal interrupted is torch.compile at work: Dynamo converting a frame, or
    Inductor compiling a graph (a backward one included). Running compiled code is neither."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.endswith(("_dynamo/convert_frame.py", "_inductor/compile_fx.py")):
            return True
        frame = frame.f_back
    return False


# Launchers stop their ranks 30 s after passing a signal on (DeepSpeed's and torchrun's): a rank
# whose step has not ended this long after its signal ends itself first, saying so.
STEP_GRACE = float(os.environ.get("GPT_RECIPES_STEP_GRACE", "20"))  # seconds


def _mark_path() -> str | None:
    """Where a rank that ends itself on a stop signal says so to the others of its run (keyed, as
    DeepSpeed's shared-memory buffers are, by the run's address and port)."""
    import tempfile

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(folder, f"gpt_recipes_stopped_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}")


def _mark(text: str) -> None:
    path = _mark_path()
    if path:
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(text)


def mark_stopped(signum: int) -> None:
    _mark(str(signum))


SAID = "said"  # the mark of a rank that ended on an error of its own, which it printed (a full disk)


def mark_said() -> None:
    _mark(SAID)


def ended_mark() -> str:
    """What another rank of this run left as it ended: a signal number, SAID, or "" (none)."""
    try:
        with open(_mark_path() or "") as f:
            return f.read().strip()
    except OSError:
        return ""


def stopped_mark() -> int:
    """The signal another rank of this run ended itself on (0: none)."""
    mark = ended_mark()
    return int(mark) if mark.isdigit() else 0


def clear_stopped_mark() -> None:
    path = _mark_path()
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


class StopSignal:
    """The first SIGTERM/SIGINT of a rank, agreed on by all ranks after each step (see the module's
    docstring). A listener thread hears a signal at once, even while the main thread waits in a
    collective or compiles (through signal.set_wakeup_fd): it ends the rank when torch.compile is
    compiling, or when the loop has not begun to save STEP_GRACE seconds later."""

    def __init__(self, on_insist=None, last_checkpoint=lambda: None) -> None:
        self.received = 0  # seen by the main thread's handler: what the agreement carries
        self.arrived = 0  # seen by the listener, as soon as the process has it
        self._first_at = 0.0
        self._on_insist = on_insist
        self._last_checkpoint = last_checkpoint
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._value = self._flag.numpy()  # read without a torch call: the flag never leaves the host
        self._pending = None  # the all-reduce started after the previous step
        self._group = None
        self.launchers = launcher_processes()
        self.resume = resume_command()  # read now, while every launcher of the run is alive
        clear_stopped_mark()  # one an earlier run on this port left
        self._checked_at = 0.0
        self._ending = threading.Lock()
        self._settled = threading.Event()  # the loop is saving, or over: no grace to keep any more
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU group, so the agreement never synchronises with the accelerator.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        self._listener = threading.Thread(target=self._listen, name="stop-listener", daemon=True)
        self._listener.start()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first_at = signum, now
            # Ctrl-C also ends a pipe reader in the same process group (`| tee log`): printing
            # into the closed pipe must not stop the save.
            sys.stdout, sys.stderr = _PipeSafe(sys.stdout), _PipeSafe(sys.stderr)
            if compiling(frame):
                self.end_now(signum, COMPILING)
        elif now - self._first_at > FORWARD_WINDOW:  # the user insists: stop now, without saving
            if self._on_insist is not None:
                self._on_insist()
            self.restore(wait=False)
            os.kill(os.getpid(), signum)

    def _listen(self) -> None:
        main = threading.main_thread().ident
        while not self.arrived:
            data = os.read(self._wake_read, 1)
            if not data or self._settled.is_set():
                break
            if data[0] in HANDLED:
                self.arrived = data[0]
        if not self.arrived:
            return
        if compiling(sys._current_frames().get(main)):
            self.end_now(self.arrived, COMPILING)
        if not self._settled.wait(STEP_GRACE):
            self.end_now(self.arrived, f"during a step that had not ended {STEP_GRACE:g} s later (launchers stop "
                                       "their ranks 30 s after passing a signal on, and a step cannot be cut short to "
                                       "save)")

    def end_now(self, signum: int, why: str) -> None:
        """End this rank at once, without saving, with one line from rank 0 (from any thread)."""
        if not self._ending.acquire(blocking=False):
            return
        ending_together()
        if int(os.environ.get("RANK", "0")) == 0:
            tag = self._last_checkpoint()
            kept = (f"the last complete checkpoint, {tag}, is intact; continue with: {self.resume}" if tag
                    else "no checkpoint was written yet")
            print(f"stopped: {signal.Signals(signum).name} received {why}: exited without saving; {kept}",
                  file=sys.stderr, flush=True)
        if self._on_insist is not None:
            self._on_insist()
        mark_stopped(signum)
        os._exit(128 + signum)

    def restore(self, wait: bool = True) -> None:
        """Put the previous signal handlers back and finish the agreement in flight (if `wait`)."""
        self._settled.set()
        if self._wake_write is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            with contextlib.suppress(OSError):
                os.write(self._wake_write, b"\0")  # the listener, if it still reads, ends
            self._listener.join(timeout=5)
            os.close(self._wake_write)
            os.close(self._wake_read)
            self._wake_write = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if wait and self._pending is not None:
            self._pending.wait()
            self._pending = None

    def launcher_gone(self) -> bool:
        # Reads /proc: at most once a second, not on every step of a fast loop.
        now = time.monotonic()
        if now - self._checked_at < LAUNCHER_CHECK_INTERVAL:
            return False
        self._checked_at = now
        return not all(map(_alive, self.launchers))

    def agreed(self) -> int:
        """The signal any rank had received by the end of the previous call's step
        (LAUNCHER_GONE if a rank lost its launcher; 0 if none): the same answer on every rank.
        On one rank there is nothing to agree on, and this step's signal is the answer."""
        if not self.received and self.launcher_gone():
            self.received = LAUNCHER_GONE
        if self._group is None:
            if self.received:
                self._settled.set()
            return self.received
        answer = 0
        if self._pending is not None:
            self._pending.wait()
            answer = int(self._value[0])
        self._value[0] = max(self.received, answer)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if answer:
            self._settled.set()  # the loop saves now; a save is not cut short
        return answer

    @staticmethod
    def exit_code(signum: int) -> int:
        return 128 + signum


PEER_CHECK_INTERVAL = 0.5  # seconds
PEER_LOST_EXIT = 5

# Set once every rank has agreed to end (an error each of them raises, a save before a stop):
# from then on another rank's exit is expected, and the first rank out must not be reported lost
# by a slower one.
_ENDING_TOGETHER = threading.Event()


def ending_together() -> None:
    """Every rank ends now with the same error: other ranks' exits are no longer losses."""
    _ENDING_TOGETHER.set()


def sibling_ranks() -> dict[int, psutil.Process]:
    """{rank: process} of the other ranks this rank's launcher started on this machine (read from
    their environment now, while they run); {} without a launcher."""
    launchers = launcher_processes()
    if not launchers:
        return {}
    me, found = os.getpid(), {}
    for proc in launchers[0].children():
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if proc.pid != me and "RANK" in env:
            found[int(env["RANK"])] = proc
    return found


class PeerWatch:
    """Notices, within half a second, that another rank on this machine has died (killed, out of
    memory, crashed), and ends this rank at once with one line naming it and the intact checkpoint.

    Without it the survivor waits inside a collective that will never complete until the launcher
    gives up on it (DeepSpeed's waits 30 s, then kills it), and the user reads only the
    launcher's "exits with return code = -9". No checkpoint can be written once a rank is gone,
    so none is attempted. Runs only while the loop trains: ranks end at different moments
    afterwards."""

    def __init__(self, rank: int, last_checkpoint, stop: StopSignal | None = None, on_exit=None):
        self.rank, self._last_checkpoint, self._stop_signal, self._on_exit = rank, last_checkpoint, stop, on_exit
        self.siblings = sibling_ranks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        if self.siblings:
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(PEER_CHECK_INTERVAL):
            if not self._stop.is_set():
                self.report_if_peer_lost()

    def report_if_peer_lost(self, wait: float = 0.0) -> None:
        """If another rank is gone (or goes within `wait` seconds: one that failed may still be
        exiting when this rank's collective with it breaks): say so, the lowest surviving rank for
        all, and end this process."""
        if not self.siblings or _ENDING_TOGETHER.is_set():
            return
        deadline = time.monotonic() + wait
        while not (gone := sorted(rank for rank, proc in self.siblings.items() if not _alive(proc))):
            if time.monotonic() >= deadline or _ENDING_TOGETHER.is_set():
                return
            time.sleep(0.1)
        if _ENDING_TOGETHER.is_set():
            return
        if self._stopped_too(gone):
            return
        alive = [self.rank, *(r for r in self.siblings if r not in gone)]
        if self.rank == min(alive):  # one survivor speaks for all
            tag = self._last_checkpoint()
            kept = (f"the last complete checkpoint, {tag}, is intact; continue with: {resume_command()}"
                    if tag else "no checkpoint was written yet")
            print(f"error: rank {', '.join(map(str, gone))} stopped while training (its process is gone: killed, "
                  f"out of memory, or failed; its own output above may say why); the other ranks stop too, without "
                  f"saving; {kept}", file=sys.stderr, flush=True)
        if self._on_exit is not None:
            self._on_exit()
        os._exit(PEER_LOST_EXIT)

    def _stopped_too(self, gone: list[int]) -> bool:
        """A rank that ended itself on a stop signal left a mark: the ranks are being stopped, not lost
        (a launcher signals its ranks one after another, as each ends). Then this rank ends too."""
        if ended_mark() == SAID:  # it printed why it ended; no second line from here
            if self._on_exit is not None:
                self._on_exit()
            os._exit(PEER_LOST_EXIT)
        signum = stopped_mark()
        if signum and self._stop_signal is not None:
            self._stop_signal.end_now(signum, f"during a step, which rank {', '.join(map(str, gone))} stopped for "
                                              "first (a step cannot be cut short to save)")
        return False

    def stop(self) -> None:
        self._stop.set()
