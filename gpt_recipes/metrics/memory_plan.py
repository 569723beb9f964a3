"""Predict per-rank memory for a model under each DeepSpeed JSON, before running anything.

Model states (parameters, gradients, optimizer state) follow the ZeRO paper's accounting
(Rajbhandari et al., 2020, section 3): with Adam in mixed precision a parameter costs
2 bytes (16-bit weight) + 2 (16-bit gradient) + 12 (fp32 master weight, momentum and
variance); in fp32, 4 + 4 + 8. Stage 1 partitions the optimizer state over the N ranks,
stage 2 also the gradients, stage 3 also the parameters. Two DeepSpeed details are added
because they are visible in measurements: its stage-1 optimizer reduce-scatters gradients
into partitions just like stage 2, and stage 3 keeps a gradient bucket of
reduce_bucket_size elements and keeps parameters below stage3_param_persistence_threshold
whole on every rank. Offloading moves the optimizer state (and under stage 3 optionally
the parameters) to host memory. With LoRA only the adapters have gradients and optimizer
state; the frozen base costs its weights alone (partitioned under stage 3).

Sequence parallelism over S ranks leaves model states as data parallelism over all ranks
has them and cuts each rank's activations to those of seq_len / S tokens. Tensor
parallelism over T ranks splits the layers' projections (not embeddings, norms or the
output layer) T ways, ZeRO partitions over the world / T data-parallel ranks, and a rank's
activations are traced on the model with 1/T of the heads and MLP width.

A pipeline of P stages holds each stage's layers on its ranks (cut where DeepSpeed cuts them,
by parameters unless the JSON says otherwise; a tied output layer is a second copy of the
embedding on the last stage), ZeRO-1 partitions over the world / P data-parallel ranks, and
under 1F1B stage s holds the activations of min(m, P - s) of the m micro-batches in flight,
for its share of the decoder blocks.

Expert parallelism over E ranks (DeepSpeed AutoEP) leaves each rank 1/E of every MoE layer's
experts; ZeRO partitions them over the world / E ranks that hold the same experts.

Activations are not guessed from a formula: one forward pass of the real model class is
traced on the meta device (no memory used) and the tensors autograd saves for backward
are summed, with attention counted as a fused kernel keeps it (inputs, output and the
log-sum-exp; no sequence-squared scores), as on GPUs and this CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from transformers import PretrainedConfig, masking_utils

from gpt_recipes import ds_config
from gpt_recipes.parallel import pipeline
from gpt_recipes.parallel.layout import Layout

GiB = 2**30
# bytes per parameter: (weights, gradients, optimizer state) for Adam
BYTES_PER_PARAM = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
STAGE3_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_param_persistence_threshold": 100_000}


@dataclass(frozen=True)
class MemoryConfig:
    """What a DeepSpeed JSON decides about memory, on the layout it asks for."""

    name: str
    stage: int
    precision: str
    offload_optimizer: bool
    offload_param: bool
    micro_batch: int
    reduce_bucket_size: int
    persistence_threshold: int
    parallel: Layout = Layout()
    grad_accum: int = 1  # with a pipeline: the micro-batches in flight

    @classmethod
    def from_config(cls, name: str, cfg: dict[str, Any], world: int) -> "MemoryConfig":
        """The JSON's memory settings on `world` ranks; a layout the recipes refuse is a UserError,
        as it is for them (parallel/layout.py)."""
        zero = cfg.get("zero_optimization") or {}

        def offloaded(key: str) -> bool:
            return (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(
            name=name,
            stage=ds_config.zero_stage(cfg),
            precision=ds_config.precision(cfg),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            micro_batch=int(cfg.get("train_micro_batch_size_per_gpu") or 1),
            reduce_bucket_size=int(zero.get("reduce_bucket_size", STAGE3_DEFAULTS["reduce_bucket_size"])),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                               STAGE3_DEFAULTS["stage3_param_persistence_threshold"])),
            parallel=Layout.of_config(cfg, world),
            grad_accum=int(cfg.get("gradient_accumulation_steps") or 1),
        )


@dataclass(frozen=True)
class ModelSizes:
    numels: tuple[int, ...]  # every parameter tensor, tied ones once
    trainable_numels: tuple[int, ...] | None = None  # those that train, when not all (LoRA)
    projections: int = 0  # parameters of the layers' Linear projections, which tensor parallelism splits
    layers: tuple[int, ...] = ()  # parameters of each pipeline layer (embedding, [positions,] blocks, norm, head)
    blocks: tuple[int, ...] = ()  # the indices of those layers that are decoder blocks
    experts: int = 0  # parameters of the MoE layers' experts, which expert parallelism splits

    def stage_parameters(self, stages: int, partition: str) -> list[int]:
        """Parameters each pipeline stage holds."""
        from gpt_recipes.parallel.pipeline import stage_bounds

        parts = stage_bounds(list(self.layers), stages, partition)
        return [sum(self.layers[parts[s]:parts[s + 1]]) for s in range(stages)]

    def pipeline_activation_factor(self, stages: int, partition: str, micro_batches: int) -> float:
        """The fullest stage's activations in whole-model micro-batches: stage s keeps min(m, P - s)
        micro-batches in flight (1F1B), each for its share of the decoder blocks."""
        from gpt_recipes.parallel.pipeline import stage_bounds

        parts = stage_bounds(list(self.layers), stages, partition)
        share = [sum(parts[s] <= b < parts[s + 1] for b in self.blocks) / len(self.blocks) for s in range(stages)]
        return max(min(micro_batches, stages - s) * share[s] for s in range(stages))

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def trainable(self) -> int:
        return self.total if self.trainable_numels is None else sum(self.trainable_numels)

    @property
    def largest(self) -> int:
        return max(self.numels)

    def below(self, threshold: int) -> int:
        return sum(n for n in self.numels if n < threshold)


@dataclass
class Estimate:
    """Per-rank bytes; `device` is what the accelerator (or, on a CPU, the process) holds."""

    layout: MemoryConfig
    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    host: float  # offloaded model states, per rank

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def device(self) -> float:
        return self.model_states + self.activations


def _meta_model(config: PretrainedConfig, lora: Any = None) -> torch.nn.Module:
    """The model on the meta device (no memory), with LoRA adapters when `lora` (a peft LoraConfig) is given."""
    from gpt_recipes.models.causal_lm import build_model

    with torch.device("meta"):
        model = build_model(config)
        if lora is not None:
            from gpt_recipes.models.adapters import add_adapters

            model = add_adapters(model, lora)
    return model


def model_sizes(config: PretrainedConfig, lora: Any = None) -> ModelSizes:
    model = _meta_model(config, lora)
    params = list(model.parameters())
    trainable = tuple(p.numel() for p in params if p.requires_grad) if lora is not None else None
    head = model.get_output_embeddings()
    projections = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
                      for p in m.parameters(recurse=False))
    layers, blocks = (), ()
    if lora is None and config.model_type in pipeline.FAMILIES:
        layers = tuple(pipeline.layer_parameters(model))
        first_block = 2 if config.model_type == "gpt2" else 1  # after the embedding (and GPT-2's positions)
        blocks = tuple(range(first_block, first_block + config.num_hidden_layers))
    experts = sum(p.numel() for p in params if p.dim() == 3)  # transformers keeps each layer's experts stacked
    return ModelSizes(tuple(p.numel() for p in params), trainable, projections, layers, blocks, experts)


def tensor_parallel_slice(config: PretrainedConfig, tp: int) -> PretrainedConfig:
    """The model one tensor-parallel rank computes: 1/tp of the heads and MLP width, same hidden size."""
    if tp == 1:
        return config
    part = config.__class__(**{**config.to_dict(), "head_dim": config.hidden_size // config.num_attention_heads})
    part.num_attention_heads //= tp
    part.num_key_value_heads //= tp
    part.intermediate_size //= tp
    return part


def estimate(layout: MemoryConfig, sizes: ModelSizes, ranks: int, activations: float) -> Estimate:
    w, g, o = BYTES_PER_PARAM[layout.precision]
    tp, pp = layout.parallel.tensor, layout.parallel.pipeline
    # A tensor-parallel rank holds 1/tp of the projections, and ZeRO partitions over the data-parallel ranks.
    split = sizes.projections * (1 - 1 / tp)
    psi, n = sizes.total - split, max(1, ranks // tp)
    trainable = sizes.trainable - split
    if pp > 1:  # the fullest stage's layers, ZeRO over the data-parallel pipelines
        psi = trainable = max(sizes.stage_parameters(pp, layout.parallel.partition))
        n = max(1, ranks // pp)
    # Expert parallelism over E ranks: a rank holds 1/E of the experts; ZeRO partitions them over the
    # world / E ranks holding the same experts, so a partitioned share is 1/world of them, as for the rest.
    elsewhere = sizes.experts * (1 - 1 / layout.parallel.expert)
    params, grads, optimizer, buffers, host = w * (psi - elsewhere), g * (trainable - elsewhere), \
        o * (trainable - elsewhere), 0.0, 0.0
    if layout.stage >= 1:
        optimizer = o * trainable / n
        grads = g * trainable / n  # DeepSpeed's stage 1 reduce-scatters gradients too
    if layout.stage == 3:
        persistent = sizes.below(layout.persistence_threshold)
        params = w * (persistent + (psi - persistent) / n)
        buffers = g * layout.reduce_bucket_size  # allocated whole, however small the model
    if layout.offload_optimizer and layout.stage >= 1:
        # The optimizer steps on the host, on fp32 copies of this rank's gradient partition.
        host += optimizer + 4 * trainable / n
        optimizer = 0.0
    if layout.offload_param and layout.stage == 3:
        host += params
        params = w * sizes.largest  # one layer's weights gathered at a time
    return Estimate(layout, params, grads, optimizer, buffers, activations, host)


def deepspeed_estimate(layout: MemoryConfig, sizes: ModelSizes, ranks_per_node: int,
                       nodes: int) -> tuple[float, float] | None:
    """DeepSpeed's own model-state estimators (stages 2 and 3 only): (device, host per node) bytes.

    They assume mixed precision and count, besides the paper's terms, fp32 gradients and a
    1.5x host buffer factor, so they read higher than `estimate`. They assume every parameter
    trains and every rank is data-parallel, so there is none for LoRA or tensor parallelism.
    """
    if layout.parallel.tensor > 1:
        return None
    if sizes.trainable_numels is not None:
        return None
    if layout.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, device = estimate_zero2_model_states_mem_needs(sizes.total, ranks_per_node, nodes,
                                                             cpu_offload=layout.offload_optimizer)
        return float(device), float(host)
    if layout.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device, _ = estimate_zero3_model_states_mem_needs(
            sizes.total, sizes.largest, ranks_per_node, nodes, cpu_offload=layout.offload_optimizer,
            cpu_offload_params=layout.offload_param, zero_init=True)
        return float(device), float(host)
    return None


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while tracing: saves what a fused kernel saves."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only goes forward
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, **kwargs):
    if kwargs.get("enable_gqa") and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _FusedAttention.apply(query, key, value)


def activation_bytes(config: PretrainedConfig, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: bool = False, fused_loss: bool = True, lora: Any = None) -> float:
    """Bytes autograd keeps for one micro-batch's forward and loss, traced on the meta device.

    fused_loss: the recipe's fused output layer and loss where the model allows it (it
    keeps the output weight's gradient instead of the logits); pass False under ZeRO-3.
    """
    from gpt_recipes.models.causal_lm import enable_activation_checkpointing
    from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model = _meta_model(config, lora).to(dtype)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa))
        # Looking for packed sequences reads values, which meta tensors do not have.
        stack.enter_context(mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda *a, **k: None))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        loss_fn = CausalLMLoss(model, fused=fused_loss and fused_unavailable(model, 0) is None)
        loss_fn(model, {"input_ids": ids}, ids)
    return float(sum(saved.values()))


# Memory a rank needs besides model states and activations: the libraries (torch and
# DeepSpeed measured ~0.45 GiB resident here) or a CUDA context and workspaces.
RUNTIME_BYTES = {"cpu": 0.5 * GiB, "cuda": 1.0 * GiB}
# Room for what a prediction of tensors leaves out (gradients of the logits, gathered
# ZeRO-3 layers, allocator slack): a plan fits only if this factor times the prediction
# fits. On a CPU the C allocator keeps freed memory, and peak resident memory measured
# here was 1.41-1.77x the predicted tensors (GPT-2 124M at ZeRO 0-3, GPT-2 large at ZeRO-3).
HEADROOM = {"cpu": 1.8, "cuda": 1.25}
# Preferred order when several configs fit: least communication first, offload last.
PREFERENCE = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


@dataclass
class PlanRow:
    estimate: Estimate
    deepspeed: tuple[float, float] | None  # DeepSpeed's (device, host per node) estimate
    need: float  # per rank, with runtime and headroom
    fits: bool
    host_need: float = 0.0  # per node: what its ranks offload (GPUs) or all they hold (CPU ranks)
    host_checked: bool = True  # False: states are offloaded but no host memory was given to check

    @property
    def verdict(self) -> str:
        return "no" if not self.fits else "yes" if self.host_checked else "yes*"


def plan(layouts: list[MemoryConfig], sizes: ModelSizes, activations_per_sample: float, ranks_per_node: int,
         nodes: int, device_memory: float | None, host_memory: float | None) -> list[PlanRow]:
    """One row per layout. With device_memory (GPUs) the device must hold each rank's share and
    the host the offloaded states of its node's ranks, by this estimate and by DeepSpeed's where it
    has one (the larger counts); without host_memory the host is not checked, and an offloading
    row says so. On CPU ranks the host holds everything, and host_memory is required."""
    rows = []
    for layout in layouts:
        est = estimate(layout, sizes, ranks_per_node * nodes, activations_per_sample * layout.micro_batch)
        ds = deepspeed_estimate(layout, sizes, ranks_per_node, nodes)
        if device_memory is not None:
            need = HEADROOM["cuda"] * est.device + RUNTIME_BYTES["cuda"]
            host_need = ranks_per_node * est.host
            if est.host and ds:  # DeepSpeed's host figure without offload is start-up in fp32, see tools/plan_memory.py
                host_need = max(host_need, ds[1])
            checked = host_memory is not None or not est.host
            fits = need <= device_memory and (host_memory is None or host_need <= host_memory)
        else:
            if host_memory is None:
                raise ValueError("CPU ranks hold everything in host memory: give host_memory")
            need = HEADROOM["cpu"] * (est.device + est.host) + RUNTIME_BYTES["cpu"]
            host_need, checked = ranks_per_node * need, True
            fits = host_need <= host_memory
        rows.append(PlanRow(est, ds, need, fits, host_need, checked))
    return rows


def recommend(rows: list[PlanRow]) -> PlanRow | None:
    """The fitting row that communicates least (see PREFERENCE); bf16 configs first, and rows whose
    host memory was checked before those whose was not."""
    fitting = [r for r in rows if r.fits]

    def rank(row: PlanRow) -> tuple:
        name = row.estimate.layout.name
        # Other layouts after these; a pipeline last, for its bubble.
        order = PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE) + (
            row.estimate.layout.parallel.pipeline > 1)
        return (not row.host_checked, row.estimate.layout.precision != "bf16", order, row.need)

    return min(fitting, key=rank) if fitting else None
