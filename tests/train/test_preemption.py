"""One interrupt however it arrives; a second, later one stops at once; a lost launcher is noticed."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from gpt_recipes.train import preemption
from gpt_recipes.train.preemption import StopSignal


def test_a_forwarded_signal_is_the_same_interrupt_and_a_later_one_insists(monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the handler wraps both streams; put them back after
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(preemption, "_ENDING_TOGETHER", threading.Event())
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


SIGNALLED = textwrap.dedent("""
    import os, signal, sys, torch
    from gpt_recipes.train.preemption import StopSignal

    stop = StopSignal(last_checkpoint=lambda: "step4")

    def backend(gm, example_inputs):
        if sys.argv[1] == "compiling":
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10**6))  # the handler runs here, inside the compile
        print("compiled")
        return gm.forward

    if sys.argv[1] == "running":
        os.kill(os.getpid(), signal.SIGTERM)
    torch.compile(lambda x: x * 2, backend=backend)(torch.ones(2))
    print("ran on, received", stop.received)
""")


@pytest.mark.parametrize("when", ["compiling", "running"])
def test_a_signal_while_compiling_stops_at_once_and_one_between_compiles_waits_for_the_step(when):
    """A compile can outlast the launcher's grace period (30 s) and cannot be cut short to save."""
    proc = subprocess.run([sys.executable, "-c", SIGNALLED, when], capture_output=True, text=True, timeout=120)
    if when == "compiling":
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
        assert "compiled" not in proc.stdout
        assert ("stopped: SIGTERM received while torch.compile was compiling (a step cannot be cut short to save): "
                "exited without saving; the last complete checkpoint, step4, is intact") in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"ran on, received {int(signal.SIGTERM)}" in proc.stdout and "stopped" not in proc.stderr


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
