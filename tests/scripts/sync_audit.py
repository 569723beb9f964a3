"""Run a recipe in this process and record every call that would make the host wait for the
device, from the first training step to each log line.

usage: python sync_audit.py OUT.json RECIPE.py [recipe flags...]
       (under torchrun, each rank writes OUT.json with .rank<N> before the suffix)

On a GPU, `.item()`, `bool(tensor)`, `.tolist()`, `.cpu()`, `nonzero` and their kind copy a
device value to the host and wait for every queued kernel. On a CPU nothing waits, but the
same calls are made: a torch function mode and a dispatch mode see them here, so a test on a
CPU catches what would stall a GPU. On a GPU, torch.cuda.set_sync_debug_mode("warn") reports
every synchronising CUDA call besides, whatever made it. Each call is attributed to the code that asked for it:

- "recipe": a frame of gpt_recipes/ or recipes/ made it, directly or through a DeepSpeed or
  transformers call other than the engine's forward, backward and step;
- "deepspeed" / "transformers": it happened inside the engine's forward, backward or step,
  which every DeepSpeed training loop calls (its site is the innermost library frame).

Tensors the recipe keeps on the host on purpose (the stop-signal flag a CPU process group
reduces) are never touched through torch in the step, so they need no exception here.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Python-level tensor methods that read a device value on the host.
# (`.to("cpu")` is left out: on a CPU the accelerator's own device is "cpu" too, so a copy to
# the device could not be told from one to the host.)
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
# Operators whose output size, or a value, the host must wait for.
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
               "aten::_unique2", "aten::repeat_interleave", "aten::equal", "aten::is_nonzero"}
ENGINE_CALLS = {"forward", "backward", "step", "_call_impl", "_wrapped_call_impl", "__call__"}


def _where(frame_summary) -> str:
    path = frame_summary.filename.replace(os.sep, "/")
    for root in ("site-packages/", "/main/", "/gpt-recipes/"):
        if root in path:
            path = path.split(root, 1)[1]
    return path


def _library(path: str) -> str | None:
    for name in ("gpt_recipes", "recipes", "deepspeed", "transformers", "torch", "tests"):
        if path.startswith(name + "/"):
            return name
    return None


def attribute(stack) -> tuple[str, str]:
    """(owner, site) of a syncing call, from its Python stack (outermost first)."""
    frames = [(f, _library(_where(f))) for f in stack]
    # Library frames only; DeepSpeed's profiling decorator says nothing about who called whom.
    frames = [(f, lib) for f, lib in frames
              if lib not in (None, "torch", "tests") and not _where(f).startswith("deepspeed/utils/nvtx.py")]
    if not frames:
        return "unknown", "?"
    innermost, lib = frames[-1]
    site = f"{_where(innermost)}:{innermost.name}"
    if lib in ("gpt_recipes", "recipes"):
        return "recipe", site
    # The innermost recipe frame, and the library call it made.
    for i in range(len(frames) - 1, -1, -1):
        frame, owner = frames[i]
        if owner in ("gpt_recipes", "recipes"):
            called = frames[i + 1][0]
            path = _where(called)
            if path.startswith("deepspeed/runtime/engine.py") and called.name in ENGINE_CALLS:
                return lib, site
            if path.startswith("torch/") or called.name in ENGINE_CALLS and lib == "transformers":
                return lib, site
            return "recipe", f"{_where(frame)}:{frame.name} -> {path}:{called.name} ... {site}"
    return lib, site


class SyncRecorder(TorchFunctionMode):
    """Records syncing calls while `active`; each as (owner, site, what). On a GPU it also turns on
    torch.cuda.set_sync_debug_mode while active and records each synchronising CUDA call it warns
    of, with the Python stack that made it."""

    def __init__(self):
        super().__init__()
        self._active = False
        self.found: dict[tuple[str, str, str], int] = {}
        self._dispatch = _DispatchSide(self)
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs):
                if "synchronizing CUDA operation" in str(message):
                    self.note("cuda sync (set_sync_debug_mode)")
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, on: bool) -> None:
        self._active = on
        if self._cuda:
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    def note(self, what: str) -> None:
        if self.active:
            owner, site = attribute([f for f in traceback.extract_stack() if f.filename != __file__])
            key = (owner, site, what)
            self.found[key] = self.found.get(key, 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.note(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._dispatch.__exit__(*exc)


class _DispatchSide(TorchDispatchMode):
    def __init__(self, recorder: SyncRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING_OPS:
            self.recorder.note(name)
        return func(*args, **(kwargs or {}))


def main() -> None:
    out, recipe, *argv = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    out_path = Path(out) if int(os.environ.get("WORLD_SIZE", "1")) == 1 else Path(out).with_suffix(f".rank{rank}.json")
    recorder = SyncRecorder()

    from gpt_recipes.train import loop
    from gpt_recipes.train.step import DataParallelStep

    step_fn, due_fn = DataParallelStep.__call__, loop._is_due
    steps = {"n": 0}

    def step(*args, **kwargs):  # from the first training step ...
        steps["n"] += 1
        recorder.active = True
        return step_fn(*args, **kwargs)

    def is_due(*args, **kwargs):  # ... until the first log line
        due = due_fn(*args, **kwargs)
        if due:
            recorder.active = False
        return due

    DataParallelStep.__call__ = step
    loop._is_due = is_due
    # DeepSpeed's own device-wide waits (its throughput and phase timers call them) are no
    # tensor operation: a no-op on a CPU, torch.cuda.synchronize() on a GPU.
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    synchronize = accelerator.synchronize

    def recorded_synchronize(*args, **kwargs):
        recorder.note("accelerator.synchronize")
        return synchronize(*args, **kwargs)

    accelerator.synchronize = recorded_synchronize
    sys.argv = [recipe, *argv]
    with recorder:
        try:
            runpy.run_path(recipe, run_name="__main__")
        except SystemExit as stop:
            if stop.code:
                raise
    out_path.write_text(json.dumps({"steps": steps["n"], "syncs": [
        {"owner": o, "site": s, "what": w, "calls": n} for (o, s, w), n in sorted(recorder.found.items())]}, indent=1))


if __name__ == "__main__":
    main()
