"""Turn SIGTERM/SIGINT on any rank into a checkpoint and a clean exit at the next step boundary.

Cluster schedulers send SIGTERM before they preempt a job, often to one process only. Each
rank records the signal; after every step the ranks agree (a max all-reduce of one integer on
a CPU process group, which never waits on the GPU) whether any of them received one, and all
of them save and exit together with status 128 + the signal number. A second signal to the
same rank stops it at once, without saving.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self) -> None:
        self.received = 0
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU group, so the agreement never synchronises with the accelerator.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}

    def _handle(self, signum, frame) -> None:
        if self.received:  # a second signal: the user insists, stop now without saving
            self.restore()
            os.kill(os.getpid(), signum)
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> int:
        """The signal any rank received (0 if none): the same answer on every rank."""
        self._flag[0] = self.received
        if self._group is not None:
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(self._flag[0])

    @staticmethod
    def exit_code(signum: int) -> int:
        return 128 + signum
