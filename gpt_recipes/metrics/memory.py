"""Memory readings: what tensors hold now, and the peak a process reached.

On a GPU both come from the caching allocator. On a CPU there is no allocator to ask:
tensor memory is the sum of the distinct storages of live tensors, and the peak is the
process's peak resident set, which also holds the libraries (~0.4 GiB with torch and
DeepSpeed) and memory the C allocator keeps after tensors are freed.
"""

from __future__ import annotations

import gc
import resource
import sys
import threading

import torch

MiB = 2**20


def tensor_memory_mb(device_type: str) -> float:
    """Bytes held by live tensors (parameters, gradients, optimizer state, buffers), in MiB."""
    if device_type == "cuda":
        return torch.cuda.memory_allocated() / MiB
    frozen = gc.get_freeze_count() > 0
    if frozen:  # gc.get_objects() leaves out what the training loop froze
        gc.unfreeze()
    gc.collect()  # tensors in unreachable cycles (freed by the next collection) are not held
    objects = gc.get_objects()
    if frozen:
        gc.freeze()
    storages: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta and not is_fake(obj):
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
                continue
    return sum(storages.values()) / MiB


def is_fake(tensor: torch.Tensor) -> bool:
    """torch.compile's stand-ins for tensors while it traces: they hold no memory."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(tensor, (FakeTensor, FunctionalTensor))


def peak_memory_mb(device_type: str) -> float:
    """Peak device memory allocated (GPU) or peak resident memory of this process (CPU), in MiB."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / MiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MiB if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class PeakAnonymous:
    """Samples this process's anonymous resident memory (Linux RssAnon) every 10 ms while
    open; `peak_mb` is the highest reading. Unlike the peak resident set, it leaves out
    file pages mapped read-only, such as checkpoint files torch.load memory-maps: the
    kernel drops those under pressure, so they are not memory the process needs."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now_mb() -> float:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def __enter__(self) -> "PeakAnonymous":
        self.peak_mb = self.now_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


class MemoryProbe:
    """Measures, once, what ZeRO and activation checkpointing change: the model states
    (parameters, gradients, optimizer state) and the activations autograd keeps.

    Model states are read after the last backward of a step that follows a completed one,
    when gradients and the (lazily created) optimizer state are both live. Activations
    are the distinct storages autograd saves for backward during one micro-batch's
    forward and loss, parameters excluded. Both are rank-local; callers take the max.
    """

    def __init__(self, model: torch.nn.Module, device_type: str):
        self.model = model
        self.device_type = device_type
        self.model_state_mb: float | None = None
        self.activation_mb: float | None = None
        self._saved: dict[int, int] = {}

    def read_model_states(self) -> None:
        self.model_state_mb = tensor_memory_mb(self.device_type)

    def saved_activations(self):
        self._saved.clear()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = tensor.untyped_storage().data_ptr()
        # Weights saved for backward are model states, not activations (under ZeRO-3 they
        # are the gathered copies, so the set is taken now).
        if ptr not in {p.untyped_storage().data_ptr() for p in self.model.parameters()}:
            self._saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    def finish_activations(self) -> None:
        self.activation_mb = sum(self._saved.values()) / MiB
        self._saved.clear()
