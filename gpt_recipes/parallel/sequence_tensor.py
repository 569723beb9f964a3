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
global batch order, loss weighting and exact resume are those of data parallelism. What
combines with what, and which models they split, parallel/layout.py decides.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import torch
from transformers import PretrainedConfig

SP_ATTENTION = "sdpa"  # Ulysses wraps one of transformers' attention functions; eager it rejects
SEQUENCE_MASK = "sequence_mask"  # a packed batch's whole-sequence mask, passed through to attention


def _kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def start_sequence_parallel(config: PretrainedConfig, sequence: int, micro_batch: int):
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
    arch.num_key_value_heads = _kv_heads(config)  # GPT-2's config does not name it
    arch._attn_implementation = SP_ATTENTION
    # Evaluation and generation run whole sequences on every rank (disable_in_eval): no sharding.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        SimpleNamespace(config=arch), SP_ATTENTION, sequence, micro_batch, seq_length_is_variable=True,
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
