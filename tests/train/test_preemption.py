"""One interrupt however it arrives; a second, later one stops at once; a lost launcher is noticed."""

import os
import signal
import subprocess
import sys
import time

import psutil

from gpt_recipes.train import preemption
from gpt_recipes.train.preemption import StopSignal


def test_a_forwarded_signal_is_the_same_interrupt_and_a_later_one_insists(monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the handler wraps both streams; put them back after
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    killed, insisted = [], []
    monkeypatch.setattr(preemption.os, "kill", lambda pid, sig: killed.append(sig))
    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    stop = StopSignal(on_insist=lambda: insisted.append(True))
    try:
        stop._handle(signal.SIGINT, None)  # the terminal's Ctrl-C
        clock[0] += 0.05
        stop._handle(signal.SIGTERM, None)  # the launcher passing it on
        assert stop.agreed() == signal.SIGINT and killed == [] and insisted == []
        clock[0] += preemption.FORWARD_WINDOW + 1
        stop._handle(signal.SIGINT, None)  # the user presses Ctrl-C again
        assert killed == [signal.SIGINT] and insisted == [True]
    finally:
        stop.restore()


def test_a_launcher_that_died_is_gone_even_before_it_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    deadline = time.monotonic() + 30
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not preemption._alive(proc)  # a zombie until its parent (this test) reaps it
    child.wait()
    assert not preemption._alive(proc) and preemption._alive(psutil.Process())


def test_no_launcher_above_a_bare_python_process():
    assert preemption.launcher_processes() == []  # pytest is not a launcher


def test_output_into_a_pipe_whose_reader_is_gone_does_not_stop_the_save():
    """Ctrl-C also ends `| tee log`: the rank's next print must not raise BrokenPipeError."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    os.close(read_end)
    safe = preemption._PipeSafe(stream)
    assert safe.write("step 52 | saved checkpoint\n") > 0
    safe.flush()  # the write above was buffered: the broken pipe shows here, and is swallowed
    assert safe.write("stopped: SIGINT received\n") > 0 and safe._closed
    try:
        stream.close()
    except BrokenPipeError:
        pass
