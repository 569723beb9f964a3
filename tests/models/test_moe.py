"""Mixture-of-experts parts without ranks: the shape read from a config, the AutoEP registry adapter,
the router's load balancing and expert load, AutoEP's names and the hub's, active-parameter FLOPs."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gpt_recipes.metrics.flops import flops_shape
from gpt_recipes.models import moe
from gpt_recipes.parallel.experts import MoEShape, adapt_output_recorder_registry, moe_shape
from gpt_recipes.train.router_balance import RouterBalance, balanced
from gpt_recipes.models.causal_lm import build_config
from gpt_recipes.models.loss import CausalLMLoss
from gpt_recipes.parallel.layout import Supports
from tests.helpers import TINY_MIXTRAL, TINY_QWEN3_MOE


def _model(spec: dict):
    raw = {k: v for k, v in spec.items() if k != "model_type"}
    config = AutoConfig.for_model(spec["model_type"], vocab_size=128, **raw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_moe_shape_reads_each_family():
    assert moe_shape(build_config("mixtral-nano", 1024, 0)) == MoEShape(8, 2, 0.001)  # transformers' Mixtral default coefficient
    assert moe_shape(build_config("qwen3-moe-nano", 1024, 0)).experts == 8
    assert moe_shape(build_config("llama-nano", 1024, 0)) is None


def test_the_registry_adapter_is_still_needed():
    """Fails once transformers' output-recorder registry takes a default in `get` as a dict does: then
    DeepSpeed's AutoEP works without parallel/experts.py's adapter, and the adapter can go."""
    from transformers.utils import output_capturing

    fresh = output_capturing._CanRecordRegistry()
    with pytest.raises(TypeError):
        fresh.get("<class 'x'>", None)


def test_the_adapted_registry_answers_both_callers():
    from transformers.utils import output_capturing

    adapt_output_recorder_registry()
    registry = output_capturing._CAN_RECORD_REGISTRY
    model = _model(TINY_MIXTRAL)
    assert registry.get(model)  # transformers' call: by model, its class's recorders
    key = str(model.__class__)
    assert registry.get(key, "missing") is registry.get(model)  # DeepSpeed's: by class name, with a default
    assert registry.get("<class 'nothing'>", "missing") == "missing"
    registry[key] = registry.get(model)  # DeepSpeed restores an entry by its name: under that name
    assert "<class 'str'>" not in registry


@pytest.mark.parametrize("spec", [TINY_MIXTRAL, TINY_QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_router_balance_adds_the_aux_loss_and_counts_every_routed_token(spec):
    model = _model(spec)
    inner = CausalLMLoss(model, fused=False)
    shape = moe_shape(model.config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs, targets = {"input_ids": ids}, torch.roll(ids, -1, 1)
    with torch.no_grad():
        plain = inner(model, inputs, targets, reduction="sum")
        balanced = RouterBalance(inner, shape, 0.5)
        total = balanced(model, inputs, targets, reduction="sum")
        aux = model(**inputs, output_router_logits=True).aux_loss
    assert total.item() == pytest.approx(plain.item() + 0.5 * aux.item() * targets.numel(), rel=1e-6)
    figures = balanced.take_metrics()
    assert figures["aux_loss"] == pytest.approx(aux.item(), rel=1e-6)
    layers = model.config.num_hidden_layers
    assert len(figures["expert_tokens"]) == layers
    for counts in figures["expert_tokens"].values():
        assert len(counts) == shape.experts and sum(counts) == ids.numel() * shape.top_k
    for name, counts in figures["expert_tokens"].items():
        assert figures["expert_imbalance"][name] == pytest.approx(max(counts) / (sum(counts) / len(counts)))
        assert 0 < figures["router_entropy"][name] <= math.log(shape.experts) + 1e-6
    assert balanced.take_metrics() == {}  # read once: the sums start again
    evaluating = balanced.for_evaluation()
    with torch.no_grad():
        assert evaluating(model, inputs, targets, reduction="sum").item() == pytest.approx(plain.item(), rel=1e-6)
    assert set(evaluating.take_metrics("val_")) == {"val_aux_loss", "val_expert_imbalance_max"}


def test_a_dense_model_keeps_its_loss():
    model = _model({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                    "intermediate_size": 64})
    inner = CausalLMLoss(model, fused=False)
    assert balanced(inner, model, None, print) is inner


def _as_autoep(state: dict) -> dict:
    """A transformers MoE state dict under AutoEP's names, as its checkpoints hold it."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            half = tensor.shape[1] // 2
            out[name.replace("gate_up_proj", "w1")], out[name.replace("gate_up_proj", "w3")] = tensor[:, :half], tensor[:, half:]
        elif name.endswith("experts.down_proj"):
            out[name.replace("down_proj", "w2")] = tensor
        elif name.endswith("mlp.gate.weight"):
            out[name.replace("mlp.gate.weight", "mlp.router.gate.weight")] = tensor
            out[name.replace("mlp.gate.weight", "mlp.gate.gate.weight")] = tensor
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("spec", [TINY_MIXTRAL, TINY_QWEN3_MOE], ids=["mixtral", "qwen3_moe"])
def test_autoep_names_map_back_to_the_model(spec):
    state = _model(spec).state_dict()
    autoep = _as_autoep(state)
    assert moe.is_autoep_state(autoep) and not moe.is_autoep_state(state)
    back = moe.from_autoep_names(autoep)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], state[name]) for name in state)


@pytest.mark.parametrize("spec, expected", [
    (TINY_MIXTRAL, "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    (TINY_QWEN3_MOE, "model.layers.0.mlp.experts.3.down_proj.weight"),
], ids=["mixtral", "qwen3_moe"])
def test_hub_names_are_the_families_own_and_load_back(tmp_path, spec, expected):
    from safetensors.torch import save_file

    model = _model(spec)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_word_embeddings}
    hub = moe.hub_names(model, state)
    assert expected in hub and not any("gate_up_proj" in name for name in hub)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in hub.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-6)


def test_flops_count_the_active_parameters():
    """mixtral-nano routes each token through 2 of 8 experts a quarter of llama-nano's MLP wide: its
    active weights are llama-nano's plus the routers."""
    dense = flops_shape(build_config("llama-nano", 8192, 0)).matmul_params
    sparse = build_config("mixtral-nano", 8192, 0)
    routers = sparse.num_hidden_layers * sparse.num_local_experts * sparse.hidden_size
    assert flops_shape(sparse).matmul_params == dense + routers
    every_expert = sum(p.numel() for n, p in AutoModelForCausalLM.from_config(sparse).named_parameters() if p.dim() == 3)
    assert every_expert == 4 * (dense - 8192 * 256 - 4 * 4 * 256 * 256)  # 4x the active experts' weights


def test_the_shipped_expert_parallel_json():
    import json

    from gpt_recipes.parallel.layout import Layout
    from tests.helpers import REPO

    cfg = json.loads((REPO / "ds_configs" / "zero2_ep2.json").read_text())
    assert Layout.of_config(cfg, 2) == Layout(2, 2, expert=2, autoep=True)
    assert Layout.of_config(cfg, 2).refusal(build_config("mixtral-nano", 1024, 0), 256, Supports(experts=True),
                                             "pretraining") is None
