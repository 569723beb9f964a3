"""Compiling the model: torch.compile through DeepSpeed's engine, or DeepSpeed's DeepCompile.

Flags own plain compilation, with the names of the Hugging Face Trainer's
(`--torch_compile`, `--torch_compile_backend`, `--torch_compile_mode`): DeepSpeed 0.19's
JSON `compile` section holds DeepCompile's options only and refuses `enabled` or `backend`.
DeepCompile (`"compile": {"deepcompile": true}`) stays the JSON's; it compiles with the
flags' backend. Either way `engine.compile` compiles the module in place
(`nn.Module.compile`), so parameter names, checkpoints and exports are the eager model's.
The loss fused with the output layer stays eager; so do evaluation's no-grad passes'
guards: they compile once more, the first time they run.

Compiling happens in the first steps (and again for each new batch shape until torch marks
the shape dynamic). The time it takes is read from torch's own compile timers and kept out
of the throughput figures; it is printed and recorded as `compile_s`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from gpt_recipes.ds_config import zero_stage
from gpt_recipes.errors import UserError

# Keys of other tools' compile settings that DeepSpeed's compile section refuses.
NOT_DEEPSPEEDS = ("enabled", "backend", "mode", "dynamic", "fullgraph")


@dataclass(frozen=True)
class CompilePlan:
    backend: str
    mode: str | None
    deepcompile: bool

    def kwargs(self) -> dict[str, Any]:
        return {"mode": self.mode} if self.mode and self.mode != "default" else {}

    def prepare(self, model: Any, stage: int) -> None:
        """Under ZeRO-3 Dynamo traces DeepSpeed's gather and release hooks with every submodule,
        and compiles them once per kind of module: raise its recompile limit (8 per function)
        above the number of submodules, or past it those hooks would run eagerly with a warning."""
        import torch._dynamo

        if stage == 3:
            modules = sum(1 for _ in model.modules())
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 2 * modules)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * modules)

    def describe(self) -> str:
        how = "DeepCompile (the JSON's compile.deepcompile)" if self.deepcompile else "torch.compile"
        mode = f", mode {self.mode}" if self.mode else ""
        return (f"Compile: {how} through DeepSpeed, backend {self.backend}{mode}; the first steps compile, and the "
                "time it takes is kept out of tokens/s")


def plan_compile(args: Any, ds_cfg: dict[str, Any], device_type: str) -> CompilePlan | None:
    """What to compile with, checked before any rank starts (None: run eagerly). Which layouts compile
    parallel/layout.py decides."""

    section = ds_cfg.get("compile")
    if section is not None and not isinstance(section, dict):
        raise UserError("DeepSpeed config: compile must be a JSON object of DeepCompile's options, such as "
                        "{\"deepcompile\": true}")
    section = section or {}
    foreign = [key for key in NOT_DEEPSPEEDS if key in section]
    if foreign:
        raise UserError(f"DeepSpeed config: compile.{foreign[0]} is not one of DeepSpeed's compile options (its "
                        "compile section is DeepCompile's); compile the model with --torch_compile "
                        "(--torch_compile_backend, --torch_compile_mode) and drop it from the JSON")
    deepcompile = section.get("deepcompile") is True
    if not args.torch_compile and not deepcompile:
        for name in ("torch_compile_backend", "torch_compile_mode"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name} takes effect with --torch_compile; add it, or drop --{name}")
        return None
    stage = zero_stage(ds_cfg)
    backend = args.torch_compile_backend or "inductor"
    _check_backend(backend, device_type)
    mode = args.torch_compile_mode
    if deepcompile:
        if stage == 0:
            raise UserError("DeepSpeed config: compile.deepcompile works with ZeRO stage 1, 2 or 3 (DeepSpeed 0.19 "
                            "falls back to plain torch.compile at stage 0); set zero_optimization.stage, or drop "
                            "compile.deepcompile and pass --torch_compile")
        if device_type != "cuda":
            raise UserError(f"DeepSpeed config: compile.deepcompile needs CUDA devices (its passes and native op "
                            f"are built for them); this run is on {device_type}: drop compile.deepcompile and pass "
                            "--torch_compile to compile the model")
        if backend not in ("inductor", "eager"):
            raise UserError(f"DeepCompile compiles with the inductor or eager backend, not {backend!r}")
    return CompilePlan(backend, mode, deepcompile)


# Backends torch lists whether or not what they need is here, and the package each imports at the
# first step (a missing one was an ImportError then); cudagraphs records CUDA graphs.
BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla", "onnxrt": "onnxruntime",
                    "tensorrt": "torch_tensorrt", "torch_tensorrt": "torch_tensorrt",
                    "ipex": "intel_extension_for_pytorch"}
CUDA_BACKENDS = ("cudagraphs",)


def _why_not_backend(backend: str, device_type: str) -> str | None:
    import importlib.util

    if "TESTING_ONLY" in backend or "minifier" in backend:
        return "one torch keeps for its own tests"
    package = BACKEND_PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return f"it needs the {package!r} package, which is not installed"
    if backend in CUDA_BACKENDS and device_type != "cuda":
        return f"it records CUDA graphs, and this run is on {device_type}"
    return None


def _check_backend(backend: str, device_type: str) -> None:
    import torch

    known = torch._dynamo.list_backends(exclude_tags=None)
    usable = [b for b in sorted(known) if _why_not_backend(b, device_type) is None]
    if backend not in known:
        raise UserError(f"--torch_compile_backend {backend!r} is not a torch.compile backend here "
                        f"({', '.join(usable)})")
    why_not = _why_not_backend(backend, device_type)
    if why_not:
        raise UserError(f"--torch_compile_backend {backend!r} cannot compile this run: {why_not}; usable here: "
                        f"{', '.join(usable)}")


def compile_seconds() -> float:
    """Seconds torch has spent compiling in this process so far: Dynamo's frame compiles
    (forward graphs, with their backend compile) and the backward graphs AOTAutograd
    compiles on their first backward. 0.0 when nothing was compiled."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0.0
    metrics = getattr(utils, "compilation_time_metrics", {})
    return float(sum(metrics.get("_compile.compile_inner", ())) + sum(metrics.get("backward._backward_impl", ())))
