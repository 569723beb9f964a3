"""A warm start for the processes the tests start directly (the ranks of a launch, a bare `python
script`): one process imports torch, transformers and DeepSpeed once (about 5 of a tiny run's 8-10
seconds here), then forks each process from that state and runs the script in it as `python -u
script args...` would: its own environment, folder, arguments, stdout and stderr, fresh random
seeds. Nothing of the project is imported before the fork, so its modules read each process's own
environment, as in a fresh interpreter. GPT_RECIPES_COLD_START=1 starts fresh interpreters instead.

Requests, one JSON line each on stdin: {"procs": [{"script", "args", "env", "cwd", "out", "err"}, ...]}.
Answers on stdout: {"pids": [...]} once every process is forked, then {"pid": P, "code": C} as each
ends (C as subprocess gives it: negative for a signal); the next request is read after the last."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time

# What every rank imports before its first op; imported in this order with no op run, so no
# thread pool exists half-made to be copied into the children.
WARM_MODULES = ("numpy", "torch", "torch.distributed", "transformers", "transformers.modeling_utils",
                "safetensors.torch", "tokenizers", "deepspeed", "deepspeed.runtime.engine",
                "deepspeed.runtime.zero.muon.muon_optimizer")


def _become(spec: dict) -> int:
    """In the forked child: become `python -u script args...`, run it, and give its exit status."""
    import io
    import runpy
    import traceback

    import numpy

    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(spec["env"])
    os.chdir(spec["cwd"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, spec["out"]), (2, spec["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True,
                                  errors="backslashreplace")
    numpy.random.seed()  # as a fresh interpreter's, not the warm process's (Python's own `random` reseeds at fork)
    sys.argv = [spec["script"], *spec["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(spec["script"]))
    code = 0
    try:
        runpy.run_path(spec["script"], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    return code


def serve() -> None:
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    answers = sys.stdout
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        pids = []
        for spec in json.loads(line)["procs"]:
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    code = _become(spec)
                finally:
                    for stream in (sys.stdout, sys.stderr):
                        try:
                            stream.flush()
                        except Exception:
                            pass
                    os._exit(code)
            pids.append(pid)
        print(json.dumps({"pids": pids}), file=answers, flush=True)
        for _ in pids:
            pid, status = os.wait()
            print(json.dumps({"pid": pid, "code": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


class WarmStart:
    """The tests' side: the warm process, started at first use with `env` and ended with the tests."""

    def __init__(self, env: dict[str, str], cwd: str):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "tests.warm_start"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending = b""
        atexit.register(self.close)
        if self._answer(300) is None:
            raise RuntimeError("the warm start did not get ready in 300 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()

    def _answer(self, timeout: float) -> dict | None:
        """The next answer, or None if none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm start ended ({self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, specs: list[dict], timeout: float) -> int:
        """Run the processes of one launch; the status of the first to fail, 0 if none did. As
        torchrun does, one that fails ends the others (SIGTERM, SIGKILL 10 s later); past `timeout`
        all are killed."""
        self.proc.stdin.write((json.dumps({"procs": specs}) + "\n").encode())
        self.proc.stdin.flush()
        forked = self._answer(60)
        if forked is None:
            raise RuntimeError("the warm start did not fork within 60 s")
        pids, codes = forked["pids"], {}
        deadline, ended, timed_out, status = time.monotonic() + timeout, None, False, 0
        try:
            while len(codes) < len(pids):
                answer = self._answer(1.0)
                if answer is not None:
                    codes[answer["pid"]] = answer["code"]
                    if answer["code"] != 0 and ended is None:
                        status, ended = answer["code"], self._signal(pids, codes, signal.SIGTERM)
                now = time.monotonic()
                if ended is not None and now - ended > 10:
                    self._signal(pids, codes, signal.SIGKILL)
                if now > deadline and not timed_out:
                    timed_out, ended = True, self._signal(pids, codes, signal.SIGKILL)
        finally:  # interrupted (Ctrl-C): no process outlives its launch, no answer is left for the next
            while len(codes) < len(pids):
                self._signal(pids, codes, signal.SIGKILL)
                answer = self._answer(10.0)
                if answer is not None:
                    codes[answer["pid"]] = answer["code"]
        if timed_out:
            raise subprocess.TimeoutExpired([s["script"] for s in specs], timeout)
        return status

    @staticmethod
    def _signal(pids: list[int], codes: dict[int, int], sig: int) -> float:
        for pid in pids:
            if pid not in codes:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        return time.monotonic()


if __name__ == "__main__":
    serve()
