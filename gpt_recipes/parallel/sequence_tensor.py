"""Sequence and tensor parallelism through DeepSpeed, switched on by the DeepSpeed JSON alone.

Sequence parallelism (DeepSpeed Ulysses, `"sequence_parallel_size": S`): the S consecutive
ranks of a group read the same samples and each keeps 1/S of every sequence. Inside each
attention layer DeepSpeed's all-to-all trades the sequence split for a head split, so every
rank attends over the whole sequence for 1/S of the heads; everything else (embeddings,
MLP, loss) is per token and runs on the local part. Activations per rank shrink by about S.

Tensor parallelism (DeepSpeed AutoTP, `"tensor_parallel": {"autotp_size": T}`): DeepSpeed
splits each attention and MLP projection of a Llama-family model across the T ranks of a
group, which all read the same samples. Weights, gradients and optimizer state per rank
shrink by about T.

In both, the data-parallel size is world / S or world / T (BatchPlan.world_size), and the
global batch order, loss weighting and exact resume are those of data parallelism.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PretrainedConfig

from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError

SP_ATTENTION = "sdpa"  # Ulysses wraps one of transformers' attention functions; eager it rejects
SEQUENCE_MASK = "sequence_mask"  # a packed batch's whole-sequence mask, passed through to attention
# AutoTP splits q/k/v/o and gate/up/down projections that are separate nn.Linear layers, as here;
# fused projections (GPT-NeoX's query_key_value) would need sub-parameter handling on export.
TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _heads(config: PretrainedConfig) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def check(plan: BatchPlan, config: PretrainedConfig, seq_len: int, lora: bool, objective: str | None) -> None:
    """A one-line error for a model, length or recipe the JSON's sequence/tensor parallelism cannot run."""
    if plan.sp == 1 and plan.tp == 1:
        return
    what = (f"sequence parallelism (sequence_parallel_size {plan.sp})" if plan.sp > 1
            else f"tensor parallelism (tensor_parallel.autotp_size {plan.tp})")
    if objective:
        raise UserError(f"{what} is not supported with {objective} yet; use a data-parallel/ZeRO config")
    if lora:
        raise UserError(f"{what} is not supported with LoRA (--use_peft) yet; use a data-parallel/ZeRO config")
    heads, kv_heads = _heads(config)
    if plan.sp > 1:
        from gpt_recipes.models.causal_lm import causal_lm_class

        if not getattr(causal_lm_class(config), "_supports_sdpa", False):
            raise UserError(f"{what}: model type {config.model_type!r} has no '{SP_ATTENTION}' attention "
                            "implementation, which DeepSpeed Ulysses wraps; use a GPT-2 or Llama-family model")
        if heads % plan.sp:
            raise UserError(f"{what}: the model's {heads} attention heads do not divide by {plan.sp}")
        if kv_heads % plan.sp and plan.sp % kv_heads:
            raise UserError(f"{what}: the model's {kv_heads} key-value heads and {plan.sp} do not divide one another")
        if seq_len % plan.sp:
            raise UserError(f"{what}: --seq_len {seq_len} does not divide by {plan.sp}; each rank keeps an equal part")
    if plan.tp > 1:
        if config.model_type == "gpt2":
            raise UserError(f"{what}: GPT-2 keeps its projections in Conv1D layers, which DeepSpeed's AutoTP does not "
                            "split; use a Llama-family model (e.g. --model llama-micro) or sequence parallelism")
        if config.model_type not in TP_MODEL_TYPES:
            raise UserError(f"{what}: model type {config.model_type!r} is not one these recipes split and export "
                            f"({', '.join(TP_MODEL_TYPES)})")
        for name, value in (("attention heads", heads), ("key-value heads", kv_heads),
                            ("MLP width", config.intermediate_size)):
            if value % plan.tp:
                raise UserError(f"{what}: the model's {value} {name} do not divide by {plan.tp}")


def describe(plan: BatchPlan) -> str | None:
    if plan.sp > 1:
        return (f"Sequence parallel: {plan.sp} ranks split each sequence (DeepSpeed Ulysses all-to-all in attention); "
                f"{plan.world_size} data-parallel group(s)")
    if plan.tp > 1:
        return (f"Tensor parallel: {plan.tp} ranks split each layer's projections (DeepSpeed AutoTP); "
                f"{plan.world_size} data-parallel group(s)")
    return None


def start_sequence_parallel(config: PretrainedConfig, plan: BatchPlan):
    """Register DeepSpeed's Ulysses attention with transformers and make the process groups;
    returns the `mpu` deepspeed.initialize needs. Call on every rank after the process group starts
    and before the first forward pass; the model must use SP_ATTENTION."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = ALL_ATTENTION_FUNCTIONS[SP_ATTENTION]

    def with_sequence_mask(module, query, key, value, attention_mask, *args, **kwargs):
        # Called on the whole sequence (after the all-to-all). DeepSpeed drops transformers' mask,
        # which was made for the local part; a packed batch brings its whole-sequence mask instead.
        mask = kwargs.pop(SEQUENCE_MASK, None)
        return core(module, query, key, value, mask if mask is not None else attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[SP_ATTENTION] = with_sequence_mask
    arch = copy.deepcopy(config)
    arch.num_key_value_heads = _heads(config)[1]  # GPT-2's config does not name it
    arch._attn_implementation = SP_ATTENTION
    # Evaluation and generation run whole sequences on every rank (disable_in_eval): no sharding.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        SimpleNamespace(config=arch), SP_ATTENTION, plan.sp, plan.micro_batch, seq_length_is_variable=True,
        disable_in_eval=True)
    ulysses = ALL_ATTENTION_FUNCTIONS[SP_ATTENTION]

    def heads_unflattened(module, query, key, value, attention_mask, *args, **kwargs):
        # Ulysses returns (batch, seq, heads * head_dim); GPT-2 reshapes from (..., heads, head_dim).
        out, weights = ulysses(module, query, key, value, attention_mask, *args, **kwargs)
        return out.view(*out.shape[:2], -1, query.shape[-1]), weights

    ALL_ATTENTION_FUNCTIONS[SP_ATTENTION] = heads_unflattened
    return mpu


class SequenceShards:
    """Samples as one sequence-parallel rank trains on them: its 1/S of every sequence.

    The counts (tokens, targets) stay those of the whole samples, so the loop weights the loss
    over the global batch as without sequence parallelism; each rank's summed loss covers its
    own part, and DeepSpeed sums gradients over the group. Position ids travel with each part
    (Ulysses gathers them for attention); a packed batch's block-diagonal mask goes whole.
    """

    def __init__(self, samples: Any, size: int, rank: int):
        self.samples, self.size, self.rank = samples, size, rank

    def __len__(self) -> int:
        return len(self.samples)

    def __getattr__(self, name: str) -> Any:  # counts, a mixture's sources: those of the samples
        return getattr(self.samples, name)

    def batch(self, indices) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, targets = self.samples.batch(indices)
        return shard_sequence(inputs, targets, self.size, self.rank)


def shard_sequence(inputs: dict[str, torch.Tensor], targets: torch.Tensor, size: int,
                   rank: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = inputs["input_ids"]
    rows, width = ids.shape
    if width % size:
        raise ValueError(f"a batch of width {width} does not split into {size} equal parts")
    positions = inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(width).expand(rows, width)
    part = slice(rank * width // size, (rank + 1) * width // size)
    local = {"input_ids": ids[:, part], "position_ids": positions[:, part]}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        local[SEQUENCE_MASK] = mask
    return local, targets[:, part]


class WholeSequences:
    """Samples evaluated whole on every sequence-parallel rank (Ulysses is off in eval mode): a
    packed batch's block-diagonal mask is handed to attention past DeepSpeed's wrapper, which drops it."""

    def __init__(self, samples: Any):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.samples, name)

    def batch(self, indices) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, targets = self.samples.batch(indices)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            inputs = {**inputs, SEQUENCE_MASK: mask}
        return inputs, targets
