"""Typed command-line arguments: dataclasses with help text, and one parser builder.

Each recipe and tool declares its flags as a dataclass; `parse_args` turns the
fields into an argparse parser (defaults and help shown in `--help`) and back.
Flags own the model, data, run length, intervals, output and seed; everything about
batches, precision, ZeRO, optimizer and scheduler lives in the DeepSpeed JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

from gpt_recipes.errors import UserError

A = TypeVar("A")

DEFAULT_DEEPSPEED_CONFIG = "ds_configs/zero2.json"


@dataclass(frozen=True)
class Valid:
    """A flag's range: `test(value)` holds for good values; `rule` completes "--flag ..." for the others."""

    test: Callable[[Any], bool]
    rule: str


def at_least(low: float, rule: str | None = None) -> Valid:
    return Valid(lambda v: v >= low, rule or f"must be at least {low}")


POSITIVE = Valid(lambda v: v > 0, "must be positive")


def within(low: float, high: float, low_in: bool = True, high_in: bool = True) -> Valid:
    """low .. high, each end included or not; said as [low, high), (low, high] and so on."""
    return Valid(lambda v: (v >= low if low_in else v > low) and (v <= high if high_in else v < high),
                 f"must lie in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}")


def flag(default: Any, help: str, valid: Valid | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field carrying its help text, its range (checked when the flags are made) and any
    extra argparse options."""
    metadata = {"help": help, **({"valid": valid} if valid else {}), **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Flags:
    """Base of the flag dataclasses: on creation each flag is checked against its range and choices,
    then each group's own checks (a `check` method) run. A group that checks several flags together
    overrides `check` and calls super().check()."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            valid, choices = f.metadata.get("valid"), f.metadata.get("choices")
            if value is None or isinstance(value, list):
                continue
            if choices is not None and value not in choices:
                raise UserError(f"--{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
            if valid is not None and not valid.test(value):
                raise UserError(f"--{f.name} {valid.rule}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Checks across flags; none by default."""


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the docstring's usage examples as written. A default that is
    None, or that the help text already describes, is not shown twice."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def finite_float(text: str) -> float:
    """A float flag's value: a number, never nan or inf (argparse's float() takes both, and a
    nan temperature or learning-rate factor would pass every comparison unseen)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


finite_float.__name__ = "float"  # argparse names the type in its messages


class _CommaList(argparse.Action):
    """A list flag's values, whether given apart (`--x a b`) or joined by commas (`--x a,b`), each
    converted to the list's item type."""

    def __init__(self, *args, item_type=str, commas=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.item_type, self.commas = item_type, commas

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        parts = (p for value in values or [] for p in (str(value).split(",") if self.commas else [str(value)]))
        for part in (p for p in parts if p != ""):
            try:
                items.append(self.item_type(part))
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise argparse.ArgumentError(self, str(err) if isinstance(err, argparse.ArgumentTypeError)
                                             else f"invalid {getattr(self.item_type, '__name__', 'value')} value: "
                                                  f"{part!r}")
        setattr(namespace, self.dest, items)


class _Parser(argparse.ArgumentParser):
    """argparse, answering an unknown flag with this project's way to say it (foreign_flags.py)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        from gpt_recipes.foreign_flags import explain_unknown

        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [a for a in extras if a.startswith("-")]
            known = [s for action in self._actions for s in action.option_strings]
            self.error(explain_unknown(flags[0], known) if flags else f"unrecognized arguments: {' '.join(extras)}")
        return namespace


def build_parser(spec: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        description=description or (spec.__doc__ or "").strip(),
        formatter_class=_HelpFormatter,
    )
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        meta = dict(f.metadata)
        meta.pop("valid", None)
        help_text = meta.pop("help", "")
        positional = meta.pop("positional", False)
        aliases = [f"--{a}" for a in meta.pop("aliases", ())]  # older spellings, still accepted
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"help": help_text, "default": default}
        if tp is bool:  # a switch: --flag, and --no-flag only where the flag is on by default
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(tp) is list:
            item = typing.get_args(tp)[0]
            kwargs["nargs"] = "*"
            kwargs["action"] = _CommaList  # `--x a b` and `--x a,b` alike
            kwargs["item_type"] = finite_float if item is float else item
            kwargs["commas"] = meta.pop("commas", True)
        else:
            kwargs["type"] = finite_float if tp is float else tp
        kwargs.update(meta)
        if positional:
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", *aliases, **kwargs)
    return parser


def parse_args(spec: type[A], argv: Sequence[str] | None = None, description: str | None = None) -> A:
    namespace = build_parser(spec, description).parse_args(argv)
    return spec(**vars(namespace))


@dataclass
class RunArgs(Flags):
    """Flags every training recipe shares (run length, intervals, output, seed)."""

    deepspeed_config: Optional[str] = flag(
        None,
        "DeepSpeed JSON: owns micro-batch, accumulation, precision, ZeRO stage, offload, optimizer, scheduler "
        "and clipping (default: the file given to `accelerate launch --deepspeed_config_file`, else "
        f"{DEFAULT_DEEPSPEED_CONFIG})",
    )
    ds: list[str] = flag([], "for this run, set a value of the DeepSpeed JSON: KEY.PATH=VALUE (a JSON value), e.g. "
                         "optimizer.params.lr=3e-4 or train_micro_batch_size_per_gpu=4; checked like the file, said "
                         "and recorded in OUTPUT_DIR/config.json", commas=False, metavar="KEY.PATH=VALUE")
    max_steps: int = flag(200, "optimizer steps (global batches) to train for", at_least(1))
    num_epochs: Optional[float] = flag(None, "train for this many passes over the training data instead of "
                                       "--max_steps (rounded up to whole steps; the scheduler's \"auto\" step "
                                       "counts follow)", POSITIVE)
    seq_len: Optional[int] = flag(None, "tokens per sample; default: the model's context length")
    seed: int = flag(1234, "seed for initialisation and the data order",
                     Valid(lambda v: 0 <= v < 2**32, "must lie between 0 and 2**32 - 1"))
    log_interval: int = flag(10, "steps between metrics lines", at_least(1))
    eval_interval: int = flag(50, "steps between validation passes (0: none in between); step 0, the baseline, and "
                              "the last step are always evaluated", at_least(0, "must be 0 (only at the end) or positive"))
    eval_batches: int = flag(8, "global batches of validation data per evaluation", at_least(1))
    save_interval: int = flag(0, "steps between checkpoints (0: only at the end)",
                              at_least(0, "must be 0 (only at the end) or positive"))
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass "
                                          "(less memory, about a third more compute)")
    router_aux_loss_coef: Optional[float] = flag(None, "mixture-of-experts models: weight of the router's "
                                                 "load-balancing loss in the training loss (default: the model "
                                                 "config's router_aux_loss_coef)", at_least(0))
    fused_loss: bool = flag(True, "compute the output layer and the loss together in chunks, never holding all "
                            "the logits (not under ZeRO-3, which partitions the output layer)")
    torch_compile: bool = flag(False, "compile the model with torch.compile through DeepSpeed (engine.compile); the "
                               "compile time is printed and kept out of tokens/s")
    torch_compile_backend: Optional[str] = flag(None, "torch.compile backend (default: inductor)")
    torch_compile_mode: Optional[str] = flag(None, "torch.compile mode (default: torch's)",
                                             choices=["default", "reduce-overhead", "max-autotune",
                                                      "max-autotune-no-cudagraphs"])
    shm_comm: bool = flag(True, "on CPU ranks that share one machine, all-reduce, all-gather and reduce-scatter through "
                          "DeepSpeed's "
                          "shared-memory kernel instead of gloo")
    peak_tflops: Optional[float] = flag(None, "peak TFLOP/s of one device at the training precision, for MFU "
                                        "(default: a table of GPUs; on a CPU, a matmul probe)", POSITIVE)
    profile_step: int = flag(0, "record this optimizer step with torch.profiler: OUTPUT_DIR/profile/step<N>.json "
                             "(top kernels or ops, device-to-host copies, host waits) and a Chrome trace (0: none)",
                             at_least(0, "must be 0 (none) or a step number"))
    keep_last: int = flag(0, "keep only the newest N complete checkpoints (0: keep all)",
                          at_least(0, "must be 0 (keep all) or positive"))
    export_hf: Optional[str] = flag(None, "after training, export the final checkpoint to this Hugging Face folder")
    eval_tasks: list[str] = flag([], "at every evaluation, also run these lm-evaluation-harness tasks on the live "
                                 "model (e.g. docstring_choice, the local task); scores go to metrics.jsonl")
    eval_limit: Optional[int] = flag(None, "with --eval_tasks: only the first N examples of each task", at_least(1))
    resume: bool = flag(False, "continue from the latest checkpoint in OUTPUT_DIR/checkpoints")
    resume_from: Optional[str] = flag(None, "continue from this checkpoint of OUTPUT_DIR instead: a tag (step400) or "
                                      "its folder; implies --resume")
    overwrite: bool = flag(False, "allow starting a fresh run in a non-empty OUTPUT_DIR (and replacing EXPORT_HF)")
    # Set by the deepspeed launcher; the rank is read from the environment instead.
    local_rank: int = flag(-1, argparse.SUPPRESS)


@dataclass
class PretrainArgs(RunArgs):
    """Pretrain a GPT-style causal LM with DeepSpeed data parallelism (ZeRO 0-3 by config)."""

    data: list[str] = flag(
        ["data/stdlib"],
        "folder(s) written by tools/prepare_data.py, with one tokenizer; several make a weighted mixture (the "
        "default is prepared on first use)",
    )
    data_weights: list[float] = flag([], "with several --data folders: their sampling weights, normalised "
                                     "(default: equal)")
    model: str = flag("gpt2-nano", "model preset name (see --list_models) or a model config JSON")
    output_dir: str = flag("runs/pretrain", "folder for metrics.jsonl, config.json and checkpoints/")
    list_models: bool = flag(False, "print the model presets and exit")


@dataclass
class AdapterArgs(Flags):
    """LoRA flags, named as in TRL's scripts; the DeepSpeed JSON still owns optimizer, precision and ZeRO."""

    use_peft: bool = flag(False, "train LoRA adapters (through peft) instead of every weight; the base stays frozen")
    lora_r: int = flag(16, "LoRA rank", at_least(1))
    lora_alpha: float = flag(32, "LoRA scaling numerator: adapters add (alpha / r) * B A x", POSITIVE)
    lora_dropout: float = flag(0.05, "dropout on the adapters' input (0 keeps runs deterministic)",
                               within(0, 1, high_in=False))
    lora_target_modules: Optional[list[str]] = flag(
        None, "module names to adapt (space- or comma-separated), or all-linear; default: all-linear, every "
        "Linear/Conv1D in the blocks but not the output layer (GPT-2: c_attn c_proj c_fc; Llama: q/k/v/o_proj "
        "gate/up/down_proj)")
    lora_modules_to_save: Optional[list[str]] = flag(None, "modules trained in full beside the adapters "
                                                     "(e.g. lm_head)")
    export_adapter: Optional[str] = flag(None, "after training, also export the adapter alone to this folder "
                                         "(peft.PeftModel.from_pretrained(base, DIR) loads it)")


@dataclass
class StartingModelArgs(AdapterArgs, RunArgs):
    """Flags of the recipes that start from a Hugging Face model and read rows of a file: the model,
    LoRA, and how rows are held out and fitted to the length (each recipe sets its data's defaults)."""

    model_name_or_path: str = flag("exported/quickstart", "Hugging Face model folder (or hub name when online)")
    val_fraction: float = flag(0.05, "fraction of the data held out when no held-out file is given",
                               Valid(lambda v: 0 < v < 1, "must lie between 0 and 1"))
    truncate: bool = flag(False, "cut rows longer than --seq_len instead of dropping them")
    pad_to_multiple_of: int = flag(64, "pad each batch to a multiple of this many tokens (at most --seq_len): few "
                                   "batch shapes keep memory flat on CPUs and suit GPU kernels; 1 pads to the longest",
                                   at_least(1))


@dataclass
class FinetuneArgs(StartingModelArgs):
    """Fine-tune a Hugging Face causal LM on prompt/response or chat data (loss on responses only)."""

    data: list[str] = flag(["data/sft_demo/train.jsonl"],
                           "JSONL/Parquet file(s) or datasets folder(s) of 'messages' or 'prompt'/'response' rows; "
                           "several make a weighted mixture (the default demo task is built on first use)")
    data_weights: list[float] = flag([], "with several --data files: their sampling weights, normalised "
                                     "(default: equal)")
    val_data: list[str] = flag([], "held-out rows, one file per --data file; default: a val.jsonl beside a "
                               "train.jsonl, else the first --val_fraction of each --data file")
    pack: bool = flag(False, "pack several examples per sequence (attention and loss stay within each)")
    output_dir: str = flag("runs/finetune", "folder for metrics.jsonl, config.json and checkpoints/")
