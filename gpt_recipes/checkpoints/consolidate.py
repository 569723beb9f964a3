"""A checkpoint's full weights, whatever its ZeRO stage, number of ranks or tensor-parallel split,
through DeepSpeed's zero_to_fp32 where it serves, and lazily, one weight at a time, for exports
in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt_recipes import console
from gpt_recipes.checkpoints.paths import latest_tag, recorded_info
from gpt_recipes.errors import UserError, first_line
from gpt_recipes.parallel import pipeline


def consolidated_state_dict(ckpt_dir: Path, tag: str | None = None, lazy: bool = False) -> dict[str, Any]:
    """The full fp32 weights of a checkpoint, whatever its ZeRO stage and number of ranks.

    ZeRO checkpoints hold the fp32 master weights partitioned across ranks' optimizer
    files; DeepSpeed's zero_to_fp32 merges them. Without a ZeRO optimizer (stage 0 in
    fp32) the module weights in the model-states file are the master weights.

    With `lazy`, weights come as lazy tensors over the memory-mapped rank files, each
    gathered by `materialize`, so the whole fp32 model is never held at once: DeepSpeed's
    own at ZeRO-3, `_Zero2Weight` at ZeRO-1/2, where DeepSpeed's merge concatenates
    every rank's partition into one fp32 vector first.
    """
    with console.quiet_prints():  # DeepSpeed's reader narrates each file it opens
        try:
            return _consolidated(ckpt_dir, tag, lazy)
        except UserError:
            raise
        except Exception as err:  # a truncated or missing shard of a checkpoint saved without sizes
            raise UserError(f"checkpoint {ckpt_dir / (tag or '')} could not be read, a file of it is damaged or "
                            f"missing: {first_line(err)}")


def _consolidated(ckpt_dir: Path, tag: str | None, lazy: bool) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise UserError(f"{ckpt_dir} holds no checkpoint{f' tagged {tag}' if tag else ''}")
    tag_dir = ckpt_dir / tag
    if pipeline.is_pipeline_checkpoint(tag_dir):
        return pipeline.hf_state_dict(tag_dir)
    info = recorded_info(tag_dir)
    if info.get("tensor_parallel", 1) > 1:
        return _tensor_parallel_weights(tag_dir, info["tensor_parallel"])
    if info.get("autoep") or info.get("expert_parallel", 1) > 1:
        return _expert_parallel_weights(tag_dir)
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        return (lazy and _lazy_zero2_weights(tag_dir)) or get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, lazy_mode=lazy)
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: t.float() for name, t in states["module"].items()}


class _Zero2Weight:
    """One weight of a ZeRO-1/2 checkpoint, gathered on demand: elements [start, start + numel)
    of its parameter group's flat fp32 vector, which the ranks' files hold as equal
    consecutive partitions."""

    def __init__(self, partitions: list[torch.Tensor], start: int, shape: torch.Size):
        self.partitions, self.start, self.shape = partitions, start, torch.Size(shape)
        self.dtype = partitions[0].dtype

    def contiguous(self) -> torch.Tensor:
        size, numel = len(self.partitions[0]), self.shape.numel()
        out = torch.empty(numel, dtype=self.dtype)
        done = 0
        while done < numel:
            rank, offset = divmod(self.start + done, size)
            take = min(size - offset, numel - done)
            out[done : done + take] = self.partitions[rank][offset : offset + take]
            done += take
        return out.view(self.shape)


def _lazy_zero2_weights(tag_dir: Path) -> dict[str, Any] | None:
    """A ZeRO-1/2 checkpoint's weights as `_Zero2Weight`s, laid out as DeepSpeed's zero_to_fp32
    lays them (parameters in order, each followed by its alignment padding); None for other
    checkpoints (ZeRO-3, frozen parameters), which DeepSpeed's own reader takes."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    if model_states[0].frozen_param_shapes:
        return None
    stage, _, flat_groups, paddings = z.parse_optim_states(z.get_optim_files(str(tag_dir)), str(tag_dir))
    if stage > 2:
        return None
    state: dict[str, Any] = dict(model_states[0].buffers)
    for group, shapes in enumerate(model_states[0].param_shapes):
        partitions = [rank_groups[group] for rank_groups in flat_groups]
        if len({len(p) for p in partitions}) != 1:
            return None  # not the equal partitions this reader assumes
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            state[name] = _Zero2Weight(partitions, offset, shape)
            offset += torch.Size(shape).numel() + (paddings[group][index] if paddings else 0)
    for alias, name in model_states[0].shared_params:
        if name in state:
            state[alias] = state[name]
    return state


def materialize(weight: Any) -> torch.Tensor:
    """A real tensor from a `consolidated_state_dict(lazy=True)` entry."""
    return weight if isinstance(weight, torch.Tensor) else weight.contiguous()


def _tensor_parallel_weights(tag_dir: Path, tp: int) -> dict[str, torch.Tensor]:
    """Whole weights from a tensor-parallel checkpoint: each TP rank's model-states file holds its
    slice of every split weight (ZeRO-0/1/2 keep the module's weights there), in the dtype the
    engine computes with. A weight is split along the one dimension where its slice's shape
    differs from the model's; the others are replicated."""
    from transformers import AutoConfig

    from gpt_recipes.models.causal_lm import causal_lm_class

    config = AutoConfig.from_pretrained(tag_dir)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in causal_lm_class(config)._from_config(config).state_dict().items()}
    shards = [torch.load(tag_dir / f"mp_rank_{t:02d}_model_states.pt", map_location="cpu", weights_only=False)["module"]
              for t in range(tp)]
    merged = {}
    for name, first in shards[0].items():
        split = [d for d, (have, whole) in enumerate(zip(first.shape, shapes.get(name, first.shape))) if have != whole]
        merged[name] = (torch.cat([s[name] for s in shards], dim=split[0]) if split else first).float()
    return merged


def _expert_parallel_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """An expert-parallel (DeepSpeed AutoEP) checkpoint's fp32 weights under the model's names, at any
    ZeRO stage. DeepSpeed's zero_to_fp32 refuses such checkpoints (each expert-parallel rank holds
    its own experts); its universal conversion gathers every parameter whole, flat at ZeRO-3."""
    import tempfile
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from transformers import AutoConfig

    from gpt_recipes.models.causal_lm import causal_lm_class
    from gpt_recipes.models.moe import from_autoep_names

    state = {}
    with tempfile.TemporaryDirectory(prefix="gpt_recipes_universal_") as tmp:
        ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        for folder in sorted((Path(tmp) / "zero").iterdir()):
            if (folder / "fp32.pt").is_file():
                saved = torch.load(folder / "fp32.pt", map_location="cpu", weights_only=False)
                state[folder.name] = (saved["param"] if isinstance(saved, dict) else saved).float()
    config = AutoConfig.from_pretrained(tag_dir)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in causal_lm_class(config)._from_config(config).state_dict().items()}
    state = from_autoep_names(state)
    return {name: t.view(shapes[name]) if name in shapes else t for name, t in state.items()}
