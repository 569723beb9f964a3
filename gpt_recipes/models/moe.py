"""Mixture-of-experts models and DeepSpeed's AutoEP: the weights a token multiplies by (for FLOPs),
and AutoEP's parameter names against the model's and the hub's. Expert parallelism itself is AutoEP (the JSON's
`"expert_parallel"` section), which replaces each MoE block at `deepspeed.initialize`.
"""

from __future__ import annotations

import re

import torch

from gpt_recipes.parallel.experts import MoEShape


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
