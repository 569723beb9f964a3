"""LoRA adapters through peft: which modules to adapt, wrapping, what a checkpoint needs, exports.

peft owns the adapter layers, merging and the adapter file format. This module is the glue
to the recipes and DeepSpeed: the adapters' initial weights depend on the seed alone (not
on whether the base was built partitioned), only adapter parameters reach the optimizer,
checkpoints leave the frozen base out and record which base they need (its folder and a
hash of its weight files), and resuming or exporting checks that base is still the same.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from gpt_recipes.args import AdapterArgs
from gpt_recipes.errors import UserError, first_line

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file name, in checkpoints and adapter exports
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def add_adapters(model: torch.nn.Module, config):
    """peft.get_peft_model, without the deprecation warning peft 0.21 triggers in transformers 5
    (it asks for is_gradient_checkpointing, renamed is_activation_checkpointing), and with every
    trainable tensor in one dtype: peft makes the adapters fp32 but copies modules_to_save in the
    base's dtype (bf16 for a bf16 export), while ZeRO-3 flattens the trainable tensors into one
    buffer and a plain copied layer must compute in the base's dtype. The base's dtype is taken
    (DeepSpeed keeps fp32 master weights of what trains)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(model, config)
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    if trainable and len({p.dtype for p in trainable}) > 1:
        for param in trainable:
            param.data = param.data.to(model.dtype)
    return adapted


def requested_targets(names: list[str] | None) -> list[str] | str:
    """--lora_target_modules as peft takes it: a list of names (split at commas too), or "all-linear"."""
    if not names:
        return ALL_LINEAR
    split = [part.strip() for name in names for part in name.split(",") if part.strip()]
    if not split:
        raise UserError("--lora_target_modules names no module")
    if ALL_LINEAR in split:
        if len(split) > 1:
            raise UserError(f"--lora_target_modules: {ALL_LINEAR} stands alone, not beside other names")
        return ALL_LINEAR
    return split


def _adaptable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)


def _leaf_names(model: torch.nn.Module, kinds: tuple[type, ...]) -> dict[str, str]:
    """{last name component: class name} of the modules of these kinds (output layer included)."""
    return {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules()
            if name and isinstance(module, kinds)}


def resolve_targets(model: torch.nn.Module, requested: list[str] | str, where: str) -> list[str]:
    """The module names the adapters go on, checked against the model (built on the meta device).

    peft matches a name to every module whose dotted path ends in it. A name that matches
    nothing, or only modules peft cannot adapt (a layer norm, say), is a one-line error that
    lists the names that would work.
    """
    adaptable = _leaf_names(model, _adaptable_types())
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
    options = ", ".join(sorted(n for n in adaptable if n != head_name))
    if requested == ALL_LINEAR:
        from transformers.pytorch_utils import Conv1D

        linear = sorted(n for n, kind in _leaf_names(model, (torch.nn.Linear, Conv1D)).items() if n != head_name)
        if not linear:
            raise UserError(f"{where} has no Linear or Conv1D layers for LoRA to adapt")
        return linear
    every = {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules() if name}
    for name in requested:
        if name not in every:
            raise UserError(f"--lora_target_modules {name}: {where} has no module of that name; its adaptable "
                            f"layers are {options} (output layer: {head_name})")
        if name not in adaptable:
            raise UserError(f"--lora_target_modules {name}: {where}'s {name} is a {every[name]}, which LoRA cannot "
                            f"adapt (peft adapts Linear, Conv1D, Embedding and convolution layers); adaptable "
                            f"here: {options}")
    return list(requested)


def weights_fingerprint(name_or_path: str) -> str:
    """sha256 over a model folder's weight files (names and bytes); for a hub name, the name and revision."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        if folder.exists() or name_or_path.startswith((".", "/")):
            raise UserError(f"model folder {name_or_path} does not exist or is not a folder")
        from transformers import AutoConfig

        try:
            revision = getattr(AutoConfig.from_pretrained(name_or_path), "_commit_hash", None) or "unknown revision"
        except Exception as err:
            raise UserError(f"could not find the model {name_or_path}: {first_line(err)}")
        return f"hub:{name_or_path}@{revision}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise UserError(f"{name_or_path} holds no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class TrainedWeights:
    """Which weights a run trains: every one (this class), or LoRA adapters on a frozen base
    (AdapterPlan). The runner asks each alike what to check, say, save, verify and export."""

    frozen_base = False  # a frozen base stays out of the optimizer and the checkpoints
    export_dir: Path | None = None  # where the trained part alone is exported (--export_adapter)

    def check_resume(self, saved: dict[str, Any] | None, where: Path) -> str | None:
        """Refuse a checkpoint of another kind; a note when it needs one."""
        return check_resume(saved, None, where)

    def describe(self, model: torch.nn.Module, stage: int) -> tuple[str | None, dict[str, Any]]:
        """(a line saying what trains, or None; the facts for config.json and each checkpoint)."""
        return None, {}

    def prepare(self, engine) -> None:
        """Once the engine exists, before the first step."""

    def checkpoint_files(self) -> list[Any]:
        """Objects with save_pretrained that each checkpoint holds besides the model config and tokenizer."""
        return []

    def finish(self, engine) -> tuple[str | None, dict[str, Any]]:
        """After the last step, on every rank (a collective): (a line, figures for metrics.jsonl)."""
        return None, {}


@dataclass
class AdapterPlan(TrainedWeights):
    """A checked LoRA setup: peft's config, and the base model it adapts."""

    config: Any  # peft.LoraConfig
    base: str  # the base model's folder (absolute) or hub name
    base_fingerprint: str
    export_dir: Path | None = None

    frozen_base = True

    @property
    def targets(self) -> list[str]:
        return sorted(self.config.target_modules)

    def wrap(self, model: PreTrainedModel, seed: int):
        """The base model with adapters in place and every base parameter frozen."""
        # Draw the adapters' initial weights from the seed alone: under ZeRO-3 building the
        # base partitioned consumes other random numbers than building it whole.
        torch.manual_seed(seed)
        try:
            return add_adapters(model, copy.deepcopy(self.config))
        except (ValueError, TypeError) as err:
            raise UserError(f"peft cannot add LoRA adapters to this {model.config.model_type} model: {first_line(err)}")

    def record(self, trainable: int | None = None) -> dict[str, Any]:
        """What OUT/config.json and each checkpoint's training.json say about the adapters."""
        lora = self.config
        return {"type": "lora", "r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                "target_modules": self.targets, "modules_to_save": sorted(lora.modules_to_save or []),
                "base_model": self.base, "base_fingerprint": self.base_fingerprint,
                **({"trainable_parameters": trainable} if trainable is not None else {})}

    def check_resume(self, saved: dict[str, Any] | None, where: Path) -> str | None:
        return check_resume(saved, self, where)

    def describe(self, model: torch.nn.Module, stage: int) -> tuple[str | None, dict[str, Any]]:
        from gpt_recipes.models.causal_lm import count_parameters

        trainable, lora = trainable_parameters(model), self.config
        line = (f"LoRA: r {lora.r}, alpha {lora.lora_alpha:g}, dropout {lora.lora_dropout:g} on "
                f"{', '.join(self.targets)}: {trainable / 1e6:.3f}M trainable parameters "
                f"({trainable / count_parameters(model):.2%}); the base is frozen"
                + (" and stays partitioned" if stage == 3 else ""))
        return line, {"adapter": self.record(trainable)}

    def prepare(self, engine) -> None:
        leave_base_out_of_checkpoints(engine)
        self._base_digest = frozen_digest(engine.module)

    def checkpoint_files(self) -> list[Any]:
        return [self.config]  # the checkpoint holds the adapters alone, and says which base they need

    def finish(self, engine) -> tuple[str | None, dict[str, Any]]:
        from gpt_recipes.parallel.distributed import all_reduce

        changed = torch.tensor(float(frozen_digest(engine.module) != self._base_digest))
        unchanged = all_reduce(changed.to(engine.device)).item() == 0
        line = ("The frozen base weights are bit for bit what they were before training, on every rank" if unchanged
                else "WARNING: the frozen base weights changed during training; please report this")
        return line, {"base_unchanged": unchanged}


def lora_config(args: AdapterArgs, model_config: PretrainedConfig, where: str, base: str | None = None):
    """peft's LoraConfig for the flags, checked against a meta-device build of the model (no memory)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    from gpt_recipes.models.causal_lm import causal_lm_class

    with torch.device("meta"):
        meta_model = causal_lm_class(model_config)._from_config(model_config, attn_implementation="sdpa")
    where = f"{where} ({model_config.model_type})"
    targets = resolve_targets(meta_model, requested_targets(args.lora_target_modules), where)
    to_save = requested_targets(args.lora_modules_to_save) if args.lora_modules_to_save else None
    if to_save is not None:
        every = {name.rsplit(".", 1)[-1] for name, _ in meta_model.named_modules() if name}
        unknown = [name for name in to_save if name not in every]
        if to_save == ALL_LINEAR or unknown:
            raise UserError(f"--lora_modules_to_save {unknown[0] if unknown else ALL_LINEAR}: {where} has no module "
                            "of that name")
    # GPT-2's Conv1D layers store their weight transposed; peft must be told (it warns and sets it otherwise).
    transposed = any(isinstance(m, Conv1D) for n, m in meta_model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, modules_to_save=to_save, bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=transposed, base_model_name_or_path=base)


def plan_adapter(args: AdapterArgs, model_config: PretrainedConfig, base: str) -> AdapterPlan | None:
    """The LoRA setup the flags ask for, with the base's fingerprint; None without --use_peft."""
    lora_flags = [f"--{name}" for name in ("lora_target_modules", "lora_modules_to_save", "export_adapter")
                  if getattr(args, name)]
    if not args.use_peft:
        if lora_flags:
            raise UserError(f"{', '.join(lora_flags)} needs --use_peft")
        return None
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    config = lora_config(args, model_config, base, base)
    return AdapterPlan(config, base, weights_fingerprint(base),
                       export_dir=Path(args.export_adapter) if args.export_adapter else None)


def leave_base_out_of_checkpoints(engine) -> None:
    """Make the engine's checkpoints hold no frozen weight under any of its names.

    DeepSpeed's save_checkpoint(exclude_frozen_parameters=True) drops each frozen parameter
    under its first name only, so a tied alias (GPT-2's lm_head.weight, which is the token
    embedding) would carry a full copy of the base's largest matrix into every checkpoint.
    """
    state_dict = engine.module_state_dict

    def without_frozen(*args, exclude_frozen_parameters: bool = False, **kwargs):
        sd = state_dict(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and sd is not None:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = without_frozen


def frozen_digest(model: torch.nn.Module) -> str:
    """sha256 of this rank's share of the frozen weights (under ZeRO-3, its partitions): equal at the
    start and end of training when nothing touched the base."""
    digest = hashlib.sha256()
    for param in model.parameters():
        if not param.requires_grad:
            local = getattr(param, "ds_tensor", param.data)
            digest.update(local.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def check_resume(saved: dict[str, Any] | None, adapter: AdapterPlan | None, where: Path) -> str | None:
    """Refuse to resume a checkpoint with another kind of run or another base; a note if the base moved."""
    if saved is None and adapter is None:
        return None
    if saved is None:
        raise UserError(f"checkpoint {where} is from full fine-tuning: resume it without --use_peft")
    if adapter is None:
        raise UserError(f"checkpoint {where} holds LoRA adapters: resume it with --use_peft")
    if saved["base_fingerprint"] != adapter.base_fingerprint:
        raise UserError(f"checkpoint {where} adapts the base model {saved['base_model']} ({_short(saved)}); "
                        f"--model_name_or_path {adapter.base} holds other weights ({_short(adapter.record())}): resume "
                        "with the base it was trained on")
    mine = adapter.record()
    changed = [f"--lora_{key} {saved[key]} -> {mine[key]}" for key in ("r", "alpha", "dropout", "target_modules",
                                                                      "modules_to_save") if saved[key] != mine[key]]
    if changed:
        raise UserError(f"checkpoint {where} was trained with other LoRA settings ({'; '.join(changed)}); resume "
                        "with the same ones")
    if saved["base_model"] != adapter.base:
        return f"The base model moved: {saved['base_model']} -> {adapter.base} (same weights)"
    return None


def _short(record: dict[str, Any]) -> str:
    return record["base_fingerprint"][:19] + "..."


def find_base(info: dict[str, Any], override: str | None, where: Path) -> str:
    """The base model folder a LoRA checkpoint needs, checked against the weights it was trained on."""
    base = override or info["base_model"]
    if Path(base).is_absolute() and not Path(base).is_dir() and override is None:
        raise UserError(f"checkpoint {where} adapts the base model in {base}, which no longer exists; pass its new "
                        "folder with --base_model")
    if weights_fingerprint(base) != info["base_fingerprint"]:
        raise UserError(f"the base model {base} has other weights than the one checkpoint {where} was trained on "
                        f"({info['base_fingerprint'][:19]}...); pass the right folder with --base_model")
    return base


def load_adapted(base: str, adapter_config_dir: Path, adapter_state: dict[str, torch.Tensor], where: Path,
                 dtype: torch.dtype = torch.float32):
    """The base model with a checkpoint's trained adapter weights (peft's PeftModel), in eval mode."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa")
    config = LoraConfig.from_pretrained(adapter_config_dir)
    config.inference_mode = True
    adapted = add_adapters(model, config)
    missing, unexpected = adapted.load_state_dict(adapter_state, strict=False)
    trained = {name for name, p in adapted.named_parameters() if "lora_" in name or "modules_to_save" in name}
    not_loaded = sorted(trained & set(missing))
    if not_loaded or unexpected:
        raise UserError(f"checkpoint {where} does not hold the adapters its {ADAPTER_CONFIG} describes "
                        f"({', '.join((not_loaded or unexpected)[:3])}...)")
    return adapted.eval()

