"""Load and check a DeepSpeed JSON, resolve batch arithmetic and fill run-dependent "auto" values.

The JSON is the only owner of batch sizes, precision, ZeRO stage, offload, optimizer,
scheduler and clipping. The recipe may fill only values that depend on the run itself
(listed in AUTO_FILLERS) and logs every value it fills.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_recipes.ds_config_keys import check_keys
from gpt_recipes.errors import UserError, first_line
from gpt_recipes.parallel.layout import Layout, zero_stage  # noqa: F401 (the stage is the layout's; read here too)

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic over the data-parallel ranks of a layout (parallel/layout.py): the ranks of
    one sequence-, tensor- or pipeline-parallel group read the same samples, so world_size counts
    data-parallel ranks."""

    micro_batch: int  # samples per data-parallel rank per forward pass
    grad_accum: int  # micro-steps per optimizer step
    world_size: int  # data-parallel ranks
    layout: Layout | None = None  # how every rank shares the work (default: data parallelism alone)

    def __post_init__(self):
        if self.layout is None:
            object.__setattr__(self, "layout", Layout(world=self.world_size))
        elif self.layout.data != self.world_size:
            raise ValueError(f"{self.world_size} data-parallel ranks, but the layout has {self.layout.data}")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def grad_divisor(self) -> int:
        """The number DeepSpeed divides a gradient summed over all ranks by."""
        return self.world_size * (self.layout.sequence if self.layout.averages_over_sequence else 1)

    @property
    def loss_divisor(self) -> int:
        """What the loop divides the loss summed over every rank and micro-step of a step by: each
        data-parallel rank's share is split over its sequence-parallel group (grad_divisor counts
        that) or repeated by each rank of its tensor-parallel group."""
        return self.grad_accum * self.grad_divisor * self.layout.tensor

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank of global rank `rank`: which part of each global batch it reads."""
        return self.layout.data_rank(rank)

    def describe(self) -> str:
        steps = "micro-batches in flight" if self.layout.pipeline > 1 else "accumulation"
        return (f"global batch {self.global_batch} = {self.micro_batch} micro x {self.grad_accum} {steps} x "
                f"{self.world_size} {self.layout.ranks_text()}")


def config_path(flag_value: str | None, default: str) -> str:
    """The JSON to use: --deepspeed_config, or the one `accelerate launch` was given.

    `accelerate launch --use_deepspeed --deepspeed_config_file F` exports F to the ranks
    (ACCELERATE_DEEPSPEED_CONFIG_FILE), so the file need not be named twice; naming two
    different files is an error rather than a silent choice.
    """
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if launcher and flag_value and Path(flag_value).resolve() != Path(launcher).resolve():
        raise UserError(f"--deepspeed_config {flag_value} differs from accelerate's --deepspeed_config_file "
                        f"{launcher}; give one of them")
    return flag_value or launcher or default


def check_launcher_precision(cfg: dict[str, Any]) -> None:
    # `accelerate launch --mixed_precision` has no effect on a DeepSpeed run: the JSON decides.
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked not in ("no", precision(cfg)):
        raise UserError(f"accelerate launch asks for --mixed_precision {asked}, but the DeepSpeed config trains in "
                        f"{precision(cfg)}; the config decides precision: drop --mixed_precision or switch the config")


class _Object(dict):
    """A JSON object as parsed, remembering keys it held more than once."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _first_duplicate(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        if getattr(node, "duplicates", None):
            return f"{prefix}.{node.duplicates[0]}" if prefix else node.duplicates[0]
        for key, value in node.items():
            found = _first_duplicate(value, f"{prefix}.{key}" if prefix else key)
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _first_duplicate(value, f"{prefix}[{i}]")
            if found:
                return found
    return None


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    return node


def load_config(path: str | Path) -> dict[str, Any]:
    """The JSON as DeepSpeed reads it: UTF-8, and a key given twice is an error (DeepSpeed's own
    loader refuses duplicates; plain json.loads would keep the last silently)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist (see ds_configs/ for examples)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start})")
    except OSError as err:
        raise UserError(f"DeepSpeed config {path} cannot be read: {err.strerror}")
    try:
        cfg = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}")
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object, not {type(cfg).__name__}")
    duplicate = _first_duplicate(cfg)
    if duplicate:
        raise UserError(f"DeepSpeed config {path}: {duplicate} appears twice (DeepSpeed refuses duplicate keys); "
                        "keep one")
    return _plain(cfg)


def _positive_int(cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    if value is None or value == "auto":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"DeepSpeed config: {key} must be a positive integer, got {value!r}")
    return value


def resolve_batch(cfg: dict[str, Any], layout: Layout) -> BatchPlan:
    """Derive the missing batch value from the other two and check that they agree.

    DeepSpeed requires train_batch_size == micro_batch * grad_accum * world_size, over the
    data-parallel ranks; any two determine the third. The resolved values are written back
    so DeepSpeed sees all three.
    """
    world_size = layout.data
    ranks = f"world size {world_size}" if layout.group == 1 else f"data-parallel size {world_size}"
    total, micro, accum = (_positive_int(cfg, k) for k in BATCH_KEYS)
    if micro is None and total is None:
        raise UserError("DeepSpeed config: set train_micro_batch_size_per_gpu (or train_batch_size)")
    if total is not None:
        if micro is None:
            accum = accum or 1
            micro, rest = divmod(total, accum * world_size)
            if rest or micro == 0:
                raise UserError(
                    f"DeepSpeed config: train_batch_size {total} is not divisible by "
                    f"gradient_accumulation_steps {accum} x {ranks}"
                )
        elif accum is None:
            accum, rest = divmod(total, micro * world_size)
            if rest or accum == 0:
                raise UserError(
                    f"DeepSpeed config: train_batch_size {total} is not divisible by "
                    f"train_micro_batch_size_per_gpu {micro} x {ranks}"
                )
        elif total != micro * accum * world_size:
            raise UserError(
                f"DeepSpeed config: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} "
                f"x gradient_accumulation_steps {accum} x {ranks} "
                f"(= {micro * accum * world_size}); fix one of them or drop train_batch_size"
            )
    plan = BatchPlan(micro_batch=micro, grad_accum=accum or 1, world_size=world_size, layout=layout)
    cfg["train_micro_batch_size_per_gpu"] = plan.micro_batch
    cfg["gradient_accumulation_steps"] = plan.grad_accum
    cfg["train_batch_size"] = plan.global_batch
    return plan


def batch_layout(cfg: dict[str, Any], world_size: int) -> BatchPlan:
    """The batch plan a config gives on `world_size` ranks, resolved as every run resolves it (the
    recipes and tools/plan_memory.py alike); the three batch keys are written back."""
    plan = resolve_batch(cfg, Layout.of_config(cfg, world_size))
    if plan.layout.tensor > 1:
        # DeepSpeed 0.19 checks train_batch_size against every rank under AutoTP, though the ranks
        # of a tensor-parallel group share their samples; micro-batch and accumulation define it.
        cfg.pop("train_batch_size")
    return plan


def precision(cfg: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32', as the config asks."""
    bf16 = (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False)
    fp16 = (cfg.get("fp16") or {}).get("enabled", False)
    if bf16 and fp16:
        raise UserError("DeepSpeed config enables both bf16 and fp16; enable one of them")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def check_device_support(cfg: dict[str, Any], device_type: str) -> None:
    # DeepSpeed's CPU accelerator rejects fp16 deep inside initialize(); say so up front.
    if precision(cfg) == "fp16" and device_type == "cpu":
        raise UserError(
            "fp16 is not supported on CPU (DeepSpeed: 'Type fp16 is not supported on your device'); "
            "use a bf16 config such as ds_configs/zero2.json"
        )


def _warmup_steps(max_steps: int) -> int:
    return max(1, round(0.05 * max_steps))


# "auto" values the recipe may fill: (section, key) -> function of the run's settings.
AUTO_FILLERS = {
    ("scheduler", "total_num_steps"): lambda settings: settings["max_steps"],
    ("scheduler", "warmup_num_steps"): lambda settings: _warmup_steps(settings["max_steps"]),
}


# DeepSpeed's monitors: config section -> the package it needs (None: none).
MONITORS = {"tensorboard": "tensorboard", "csv_monitor": None, "wandb": "wandb", "comet": "comet_ml"}


def fill_schedule(cfg: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """Fill the scheduler's "auto" step counts from the run's length, in place; returns {dotted key: value}."""
    settings = {"max_steps": max_steps}
    filled: dict[str, Any] = {}
    sched_params = (cfg.get("scheduler") or {}).get("params") or {}
    for (section, key), fill in AUTO_FILLERS.items():
        if section == "scheduler" and sched_params.get(key) == "auto":
            sched_params[key] = fill(settings)
            filled[f"scheduler.params.{key}"] = sched_params[key]
    return filled


def fill_auto(cfg: dict[str, Any], max_steps: int | None, monitor_dir: Path | None = None) -> dict[str, Any]:
    """Fill run-dependent "auto" values in place; returns {dotted key: value} of what was filled.

    The scheduler's step counts follow from --max_steps (with max_steps None they are left for
    fill_schedule, once the run's length is known); an enabled TensorBoard or CSV monitor with no
    output_path (or "auto") writes into `monitor_dir` (the run folder's monitor/). Any other
    "auto" is an error: the JSON owns those settings and must state them.
    """
    filled = fill_schedule(cfg, max_steps) if max_steps is not None else {}
    for name in enabled_monitors(cfg):
        section = cfg[name]
        if name in ("tensorboard", "csv_monitor") and section.get("output_path", "") in ("", "auto"):
            if monitor_dir is None:
                raise UserError(f"DeepSpeed config: {name}.output_path must be given here")
            section["output_path"] = str(monitor_dir)
            section.setdefault("job_name", name)
            filled[f"{name}.output_path"] = section["output_path"]
    later = {f"{s}.params.{k}" for s, k in AUTO_FILLERS} if max_steps is None else set()
    leftover = [k for k, v in _walk(cfg) if v == "auto" and k not in later]
    if leftover:
        raise UserError(
            f"DeepSpeed config: {', '.join(leftover)} is 'auto', but the recipe fills only "
            f"{', '.join('.'.join((s, 'params', k)) for s, k in AUTO_FILLERS)}; give a value"
        )
    return filled


def keep_saved_schedule(cfg: dict[str, Any], filled: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple]:
    """On resume, put back the scheduler values the checkpoint's run filled for "auto".

    Re-filling them from a new --max_steps would change the schedule under a running
    optimizer (a longer total jumps the learning rate back up). Updates cfg and filled in
    place; returns {dotted key: (kept value, the value --max_steps alone would give)} where
    they differ.
    """
    params = (cfg.get("scheduler") or {}).get("params") or {}
    kept = {}
    for key, value in list(filled.items()):
        if key.startswith("scheduler.params.") and key in saved and saved[key] != value:
            params[key.rsplit(".", 1)[1]] = filled[key] = saved[key]
            kept[key] = (saved[key], value)
    return kept


def enabled_monitors(cfg: dict[str, Any]) -> list[str]:
    """The monitor sections the config enables; a missing package is a one-line error."""
    import importlib.util

    names = [name for name in MONITORS if isinstance(cfg.get(name), dict) and cfg[name].get("enabled")]
    for name in names:
        package = MONITORS[name]
        if package and importlib.util.find_spec(package) is None:
            raise UserError(f"DeepSpeed config enables the {name} monitor, but the {package!r} package is not "
                            f"installed: pip install {package}, or set {name}.enabled to false")
    return names


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "bfloat16", "fp16")
# Top-level keys users write most; a key close to one of these but not it is a typo.
WELL_KNOWN_KEYS = (*BATCH_KEYS, *SECTIONS, "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
                   "activation_checkpointing", "checkpoint", "tensorboard", "csv_monitor", "wandb", "comet",
                   "flops_profiler", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
                   "sequence_parallel_size", "tensor_parallel", "data_types", "torch_autocast", "memory_breakdown",
                   "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "amp", "compile", "timers")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wrong(path: str, kind: str, value: Any) -> UserError:
    return UserError(f"DeepSpeed config: {path} must be {kind}, not {json.dumps(value)}")


def _check_value(path: str, value: Any, annotation: Any) -> None:
    """`value` as DeepSpeed's field type asks: booleans are JSON booleans, integers are integers
    (not true), numbers are numbers (not strings), sections are objects. DeepSpeed's own parser
    would coerce "false" to False and true to 1, so the recipe would print one thing and run another."""
    import enum
    import types
    import typing

    import pydantic

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or len(options) != 1:
            return  # several types allowed: DeepSpeed's parser decides
        annotation = options[0]
    if not isinstance(annotation, type):
        return
    if annotation is bool:
        if not isinstance(value, bool):
            raise _wrong(path, "true or false", value)
    elif annotation is int or issubclass(annotation, enum.IntEnum) or (
            issubclass(annotation, enum.Enum) and all(isinstance(m.value, int) for m in annotation)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong(path, "an integer", value)
    elif annotation is float:
        if not _number(value):
            raise _wrong(path, "a number", value)
    elif issubclass(annotation, pydantic.BaseModel):
        if not isinstance(value, dict):
            raise _wrong(path, "a JSON object", value)
        _check_section(path, value, annotation)


def _check_section(path: str, section: dict[str, Any], model: Any) -> None:
    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info
        if info.alias:
            fields[info.alias] = info
    for key, value in section.items():
        if key in fields:
            _check_value(f"{path}.{key}", value, fields[key].annotation)


def _typed_sections() -> dict[str, Any]:
    """Config sections DeepSpeed parses with a typed model: their values are checked strictly."""
    from deepspeed.compile.config import CompileConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils.config import DeepSpeedThroughputTimerConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "bfloat16": DeepSpeedBF16Config,
            "fp16": DeepSpeedFP16Config, "compile": CompileConfig, "timers.throughput": DeepSpeedThroughputTimerConfig}


# Top-level keys DeepSpeed reads as plain values, by the type it expects.
TOP_LEVEL_TYPES = {"steps_per_print": int, "wall_clock_breakdown": bool, "memory_breakdown": bool,
                   "prescale_gradients": bool, "gradient_predivide_factor": float,
                   "zero_allow_untested_optimizer": bool, "zero_force_ds_cpu_optimizer": bool,
                   "sequence_parallel_size": int}


def check_types(cfg: dict[str, Any]) -> None:
    """Every value DeepSpeed gives a type, of that type; an NVMe offload with its path."""
    for key, kind in TOP_LEVEL_TYPES.items():
        if key in cfg:
            _check_value(key, cfg[key], kind)
    for dotted, model in _typed_sections().items():
        node: Any = cfg
        for key in dotted.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            _check_value(dotted, node, model)
    zero = cfg.get("zero_optimization") or {}
    for kind in ("offload_optimizer", "offload_param"):
        offload = zero.get(kind) or {}
        if offload.get("device") == "nvme" and not offload.get("nvme_path"):
            raise UserError(f"DeepSpeed config: zero_optimization.{kind}.device is nvme but no nvme_path is given; "
                            "name a folder on a fast local disk, or offload to \"cpu\"")


def check_training_sections(cfg: dict[str, Any]) -> None:
    """What DeepSpeed checks only inside initialize(), on every rank, as an assertion: the
    sections' types, the optimizer and scheduler names, the learning rate and clipping."""
    import difflib

    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    for name in SECTIONS:
        if name in cfg and not isinstance(cfg[name], dict):
            raise UserError(f"DeepSpeed config: {name} must be a JSON object (see ds_configs/), "
                            f"not {json.dumps(cfg[name])}")
    for key in cfg:
        close = difflib.get_close_matches(key, WELL_KNOWN_KEYS, n=1, cutoff=0.8)
        if key not in WELL_KNOWN_KEYS and close:  # DeepSpeed ignores unknown keys: a typo would pass unseen
            raise UserError(f"DeepSpeed config: unknown key {key!r}; did you mean {close[0]!r}?")
    optimizer = cfg.get("optimizer")
    if not optimizer or "type" not in optimizer:
        raise UserError("DeepSpeed config: the optimizer section needs a \"type\" (e.g. \"AdamW\") and its "
                        "\"params\"; the JSON owns the optimizer (see ds_configs/)")
    for section in ("optimizer", "scheduler"):
        params = (cfg.get(section) or {}).get("params")
        if params is not None and not isinstance(params, dict):
            raise _wrong(f"{section}.params", "a JSON object", params)
    kind = str(optimizer["type"])
    if kind.lower() not in DEEPSPEED_OPTIMIZERS and not isinstance(getattr(torch.optim, kind, None), type):
        known = sorted({*DEEPSPEED_OPTIMIZERS, *(n for n, v in vars(torch.optim).items()
                                                 if isinstance(v, type) and issubclass(v, torch.optim.Optimizer))})
        close = difflib.get_close_matches(kind.lower(), [k.lower() for k in known], n=1)
        raise UserError(f"DeepSpeed config: optimizer type {kind!r} is neither a DeepSpeed optimizer nor one of "
                        f"torch.optim's" + (f" (did you mean {close[0]!r}?)" if close else "") +
                        f"; DeepSpeed's are {', '.join(DEEPSPEED_OPTIMIZERS)}")
    lr = (optimizer.get("params") or {}).get("lr")
    if lr is not None and not (_number(lr) and lr > 0):
        raise UserError(f"DeepSpeed config: optimizer.params.lr must be a positive number, got {json.dumps(lr)}")
    _check_params("optimizer", kind, optimizer.get("params"), _optimizer_classes(kind), OPTIMIZER_KEYS)
    scheduler = cfg.get("scheduler")
    if scheduler is not None and scheduler.get("type") not in VALID_LR_SCHEDULES:
        raise UserError(f"DeepSpeed config: scheduler type {scheduler.get('type')!r} is not one DeepSpeed knows "
                        f"({', '.join(VALID_LR_SCHEDULES)})")
    if scheduler is not None:
        from deepspeed.runtime import lr_schedules

        _check_params("scheduler", scheduler["type"], scheduler.get("params"),
                      [getattr(lr_schedules, scheduler["type"])], {})
    clip = cfg.get("gradient_clipping", 0.0)
    if not (_number(clip) and clip >= 0):
        raise UserError(f"DeepSpeed config: gradient_clipping must be a number >= 0 (0: off), got {json.dumps(clip)}")


# Optimizer parameters DeepSpeed itself reads before building the optimizer.
OPTIMIZER_KEYS = {"torch_adam": False, "adam_w_mode": True, "fp32_optimizer_states": True}


def _optimizer_classes(kind: str) -> list[Any]:
    """The classes DeepSpeed may build for an optimizer type (their parameters are what it takes);
    [] for types whose parameters are not checked here."""
    import torch

    name = kind.lower()
    if name in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        return [torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam]
    if name == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        return [DeepSpeedCPULion, FusedLion]
    if name == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        return [torch.optim.Adagrad, DeepSpeedCPUAdagrad]
    torch_class = getattr(torch.optim, kind, None)
    return [torch_class] if isinstance(torch_class, type) and name not in DEEPSPEED_OPTIMIZER_NAMES else []


DEEPSPEED_OPTIMIZER_NAMES = ("adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon")
# Positional arguments of optimizers and schedulers that the engine passes itself.
NOT_CONFIG = {"self", "params", "model_params", "optimizer", "last_batch_iteration"}


def _check_params(section: str, kind: str, params: Any, classes: list[Any], extra: dict[str, Any]) -> None:
    """Each of a section's params is a parameter of the class DeepSpeed builds, of its default's type."""
    import difflib
    import inspect

    if params is None or not classes:
        return
    if not isinstance(params, dict):
        raise _wrong(f"{section}.params", "a JSON object", params)
    defaults: dict[str, Any] = dict(extra)
    for cls in classes:
        for name, p in inspect.signature(cls).parameters.items():
            if name not in NOT_CONFIG and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if defaults.get(name) in (None, inspect.Parameter.empty):
                    defaults[name] = p.default
    for key, value in params.items():
        path = f"{section}.params.{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            raise UserError(f"DeepSpeed config: {path} is not a parameter of {kind}"
                            + (f"; did you mean {close[0]!r}?" if close else "")
                            + f" ({kind} takes {', '.join(sorted(defaults))})")
        default = defaults[key]
        if value == "auto" and (section, key) in AUTO_FILLERS:
            continue
        if isinstance(default, bool):
            _check_value(path, value, bool)
        elif isinstance(default, (int, float)) or default is inspect.Parameter.empty and value is not None:
            if not _number(value):  # an int default (SGD's momentum=0) still takes 0.9
                raise _wrong(path, "a number", value)
        elif isinstance(default, tuple):
            if not (isinstance(value, list) and len(value) == len(default) and all(map(_number, value))):
                raise _wrong(path, f"a list of {len(default)} numbers", value)


def check_with_deepspeed(cfg: dict[str, Any]) -> None:
    """Let DeepSpeed's own config parser read the JSON before any rank starts, so its errors (a
    misspelt ZeRO field, a value of the wrong type) are one line here instead of a traceback on
    every rank. The batch sizes were checked for the real world size already."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(cfg)
    probe.pop("train_batch_size", None)  # DeepSpeed would check it against a world of one
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"DeepSpeed config: {err.title} rejects it: {problems}")
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"DeepSpeed config: DeepSpeed rejects it: {first_line(err)}")


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, tuple[Any, Any]]:
    """Set `--ds KEY.PATH=VALUE` values in the JSON as loaded (VALUE read as JSON, else as text);
    returns {key path: (value before, value now)}. What they make is checked as the file is."""
    changed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise UserError(f"--ds {item!r}: give KEY.PATH=VALUE, e.g. optimizer.params.lr=3e-4")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = cfg
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--ds {item!r}: {'.'.join(parts[:i + 1])} is not a section of the DeepSpeed config "
                                f"(it is {json.dumps(node)})")
        before = changed[key.strip()][0] if key.strip() in changed else node.get(parts[-1], "(not set)")
        changed[key.strip()] = (before, value)  # what the JSON held, however often --ds names the key
        node[parts[-1]] = value
    return changed


def resolve(path: str | Path, world_size: int, max_steps: int | None, device_type: str,
            monitor_dir: Path | None = None, overrides: list[str] | None = None) -> tuple[dict, BatchPlan, dict]:
    """Load, check and resolve a DeepSpeed JSON for this run (with `--ds` overrides applied first):
    (config, batch plan, filled values). With max_steps None the scheduler's "auto" step counts
    are left for fill_schedule."""
    cfg = copy.deepcopy(load_config(path))
    apply_overrides(cfg, overrides or [])
    check_training_sections(cfg)
    check_types(cfg)
    zero_stage(cfg)
    check_device_support(cfg, device_type)
    check_launcher_precision(cfg)
    plan = batch_layout(cfg, world_size)
    filled = fill_auto(cfg, max_steps, monitor_dir)
    check_with_deepspeed(cfg)
    check_keys(cfg)
    return cfg, plan, filled
