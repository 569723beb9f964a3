"""Mixture-of-experts models: what a config says of its experts, and what DeepSpeed's AutoEP needs.

transformers' MoE families (Mixtral, Qwen2/3-MoE, ...) name their expert count and top-k
differently; `moe_shape` reads both from a config, so the FLOP count, the planner and the
logged expert load need no family names elsewhere. Expert parallelism itself is DeepSpeed's
AutoEP (the JSON's `"expert_parallel"` section), which replaces each MoE block at
`deepspeed.initialize`.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import PretrainedConfig

from gpt_recipes.metrics.device_sums import DeviceSums
from gpt_recipes.metrics.summary import Column, Curve, Report

# (config field for the number of routed experts, for the experts each token goes to), by family.
_EXPERT_FIELDS = (("num_local_experts", "num_experts_per_tok"), ("num_experts", "num_experts_per_tok"),
                  ("n_routed_experts", "num_experts_per_tok"))


@dataclass(frozen=True)
class MoEShape:
    experts: int  # routed experts per MoE layer
    top_k: int  # experts each token is sent to
    aux_loss_coef: float  # the router's load-balancing loss weight in the config

    @property
    def active_fraction(self) -> float:
        return self.top_k / self.experts


def moe_shape(config: PretrainedConfig) -> MoEShape | None:
    """The config's experts, or None for a dense model."""
    for experts_field, top_k_field in _EXPERT_FIELDS:
        experts, top_k = getattr(config, experts_field, None), getattr(config, top_k_field, None)
        if isinstance(experts, int) and experts > 1 and isinstance(top_k, int):
            return MoEShape(experts, top_k, float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))
    return None


def registry_needs_adapter() -> bool:
    """True while transformers' output-recorder registry takes no default in `get` (transformers 5.x),
    where DeepSpeed 0.19.8's AutoEP calls `registry.get(key, default)` and sets entries by class name."""
    from transformers.utils import output_capturing

    registry = type(output_capturing._CAN_RECORD_REGISTRY)
    return registry is not dict and len(inspect.signature(registry.get).parameters) < 3


def adapt_output_recorder_registry() -> None:
    """Let the registry be read and written as DeepSpeed's AutoEP does (keys that are class names,
    `get` with a default) while transformers' own calls (keys that are models) mean what they did.
    The one registry object is re-classed in place, so every module that imported it sees the change."""
    if not registry_needs_adapter():
        return
    from transformers.utils import output_capturing

    base = type(output_capturing._CAN_RECORD_REGISTRY)

    class _NamesOrModels(base):
        _missing = object()

        def __setitem__(self, key, value):
            dict.__setitem__(self, key if isinstance(key, str) else str(key.__class__), value)

        def get(self, key, default=_missing):
            if not isinstance(key, str):
                return base.get(self, key)
            return dict.get(self, key) if default is self._missing else dict.get(self, key, default)

    output_capturing._CAN_RECORD_REGISTRY.__class__ = _NamesOrModels


def matmul_weights(model: torch.nn.Module, shape: MoEShape) -> float:
    """Weights a token multiplies by in an MoE model: the dense projections, each layer's router,
    and top_k of its experts (an expert's weights are 3-D parameters, one slice per expert)."""
    total = 0.0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                total += param.numel() * shape.active_fraction
            elif param.dim() == 2 and name == "weight" and not isinstance(module, torch.nn.Embedding):
                total += param.numel()
    return total


# --- The router's load-balancing loss and the expert load ----------------------------------------------


class RouterBalance:
    """A loss part for MoE models (see step.Loss): the wrapped loss plus `coef` x the router's
    load-balancing loss (the model's own `aux_loss`, Switch Transformer's), as transformers and
    TRL add it, and the expert load, summed on the device until read.

    With reduction "sum" each micro-batch's auxiliary loss is weighted by its targets, so the
    step's loss is the mean cross-entropy plus coef x the target-weighted mean auxiliary loss
    over the global batch's micro-batches, however they are spread over ranks."""

    def __init__(self, inner, shape: MoEShape, coef: float):
        self.inner, self.shape, self.coef = inner, shape, coef
        self.perplexity = inner.perplexity
        self.sums = DeviceSums()

    @property
    def fused(self) -> bool:
        return getattr(self.inner, "fused", False)

    def for_evaluation(self) -> "RouterBalance":
        """Held-out loss is the wrapped loss alone (comparable with a dense model's); the load is counted."""
        return RouterBalance(self.inner.for_evaluation(), self.shape, 0.0)

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        seen = {}

        def routed(**kwargs):
            seen["out"] = out = forward(**kwargs, output_router_logits=True)
            return out

        loss = self.inner(routed, inputs, targets, reduction)
        out = seen["out"]
        aux = out.aux_loss
        self._count(out.router_logits, inputs.get("attention_mask"))
        self.sums.add(aux_loss=aux.detach().float(), micro_batches=1.0)
        if self.coef:
            weight = (targets != -100).sum() if reduction == "sum" else 1
            loss = loss + self.coef * aux.to(loss.dtype) * weight
        return loss

    def _count(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> None:
        keep = None if mask is None else mask.reshape(-1, 1).float()
        figures = {}
        for layer, logits in enumerate(router_logits):
            probs = logits.detach().float().softmax(-1)
            if keep is not None and keep.shape[0] == probs.shape[0]:
                probs = probs * keep
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(self.shape.top_k, dim=-1).indices, 1.0)
            if keep is not None and keep.shape[0] == probs.shape[0]:
                chosen = chosen * keep
            figures[f"expert_tokens_{layer}"] = chosen.sum(0)
            figures[f"router_entropy_{layer}"] = -(probs * probs.clamp_min(1e-20).log()).sum()
            figures[f"router_rows_{layer}"] = keep.sum() if keep is not None and keep.shape[0] == probs.shape[0] \
                else float(probs.shape[0])
        self.sums.add(**figures)

    def take_metrics(self, prefix: str = "") -> dict[str, Any]:
        """aux_loss (the mean over micro-batches), and per layer the tokens each expert took (summed over
        ranks; they add up to tokens x top_k), the load imbalance (the fullest expert's tokens over the
        mean) and the router's mean entropy per token (nats; log(experts) is uniform routing)."""
        figures = self.inner.take_metrics(prefix)
        if not self.sums:
            return figures
        read = self.sums.read()
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in read if k.startswith("expert_tokens_"))
        tokens = {f"layer{i}": [round(v) for v in read[f"expert_tokens_{i}"]] for i in layers}
        imbalance = {name: max(counts) / (sum(counts) / len(counts)) if sum(counts) else 0.0
                     for name, counts in tokens.items()}
        entropy = {f"layer{i}": read[f"router_entropy_{i}"] / max(1.0, read[f"router_rows_{i}"]) for i in layers}
        figures.update({f"{prefix}aux_loss": read["aux_loss"] / read["micro_batches"],
                        f"{prefix}expert_imbalance_max": max(imbalance.values(), default=0.0)})
        if not prefix:
            figures.update(expert_tokens=tokens, expert_imbalance=imbalance, router_entropy=entropy)
        return figures


def balanced(loss_fn, model: torch.nn.Module, coef: float | None, say: Callable[[str], None]):
    """`loss_fn` with the router's load balancing for an MoE model (coef None: the model config's), said;
    a dense model's loss unchanged."""
    shape = moe_shape(model.config)
    if shape is None:
        return loss_fn
    coef = shape.aux_loss_coef if coef is None else coef
    say(f"Mixture of experts: {shape.experts} experts, top-{shape.top_k} per token; router load-balancing loss x "
        f"{coef:g} added to the training loss (--router_aux_loss_coef; val_loss is the cross-entropy alone); "
        "tokens per expert, load imbalance and router entropy per layer in metrics.jsonl")
    return RouterBalance(loss_fn, shape, coef)


def line_text(record: dict[str, Any]) -> str:
    """An MoE run's part of a training log line."""
    if "aux_loss" not in record:
        return ""
    return f" | aux_loss {record['aux_loss']:.4f} | expert load max/mean {record['expert_imbalance_max']:.2f}"


REPORT = Report(
    columns=(Column("expert_imbalance_max", "expert load max/mean (last)",
                    lambda lines, measured: next((l["expert_imbalance_max"] for l in reversed(lines)
                                                  if "expert_imbalance_max" in l), None), "{:.2f}".format),),
    curves=(Curve("expert_load.png", "Expert load (fullest layer)", "fullest expert's tokens / mean", "step",
                  ("expert_imbalance_max", "training"), ("val_expert_imbalance_max", "held-out")),))


# --- Checkpoints: DeepSpeed AutoEP's names and the model's --------------------------------------------

_AUTOEP_EXPERT = re.compile(r"^(.*\.experts)\.(w1|w2|w3)$")
_AUTOEP_ROUTER = re.compile(r"^(.*)\.router\.gate\.weight$")
_AUTOEP_ALIAS = re.compile(r"^(.*)\.gate\.gate\.weight$")  # the same router, under a second name


def from_autoep_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights under DeepSpeed AutoEP's names (experts as w1/w2/w3 stacked [experts, out, in],
    the router as router.gate) under the transformers model's: gate_up_proj = [w1; w3] along
    the output dimension, down_proj = w2, the router as gate.weight. Other names pass through."""
    out, experts = {}, {}
    for name, tensor in state.items():
        if m := _AUTOEP_EXPERT.match(name):
            experts.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif m := _AUTOEP_ROUTER.match(name):
            out[f"{m.group(1)}.gate.weight"] = tensor
        elif not _AUTOEP_ALIAS.match(name):
            out[name] = tensor
    for prefix, w in experts.items():
        out[f"{prefix}.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        out[f"{prefix}.down_proj"] = w["w2"]
    return out


def is_autoep_state(names) -> bool:
    return any(_AUTOEP_EXPERT.match(n) for n in names)


def hub_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict under the names the model family's hub checkpoints use (Mixtral's
    block_sparse_moe.experts.N.w1, Qwen-MoE's mlp.experts.N.gate_proj), as save_pretrained writes
    them: transformers' own reverse of the conversion it applies when loading."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)
