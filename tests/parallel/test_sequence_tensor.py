"""Sequence/tensor-parallel settings: the JSON's checks, the model checks, and how a sample is split."""

import json

import pytest
import torch
from transformers import AutoConfig

from gpt_recipes import ds_config
from gpt_recipes.checkpoints.paths import layout_change
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError
from gpt_recipes.parallel import sequence_tensor
from tests.helpers import REPO, resolve_config


def _resolve(tmp_path, world_size=2, stage=2, **extra):
    return resolve_config(tmp_path, world_size, stage, **extra)


TP2 = {"autotp_size": 2, "vocab_parallel_lm_head": False}


def test_layout_from_the_json(tmp_path):
    _, plan, _ = _resolve(tmp_path, world_size=4, sequence_parallel_size=2)
    assert (plan.world_size, plan.sp, plan.tp) == (2, 2, 1)
    assert [plan.data_rank(r) for r in range(4)] == [0, 0, 1, 1]  # a group's ranks read the same samples
    assert plan.global_batch == 2 * plan.micro_batch and plan.grad_divisor == 2
    _, plan, _ = _resolve(tmp_path, world_size=4, stage=3, sequence_parallel_size=2)
    assert plan.grad_divisor == 4  # ZeRO-3's reduce-scatter averages over every rank
    cfg, plan, _ = _resolve(tmp_path, world_size=2, tensor_parallel=TP2)
    assert (plan.world_size, plan.tp, plan.global_batch) == (1, 2, plan.micro_batch)


@pytest.mark.parametrize("extra, stage, message", [
    ({"sequence_parallel_size": 2, "tensor_parallel": TP2}, 2, "one of them at a time"),
    ({"sequence_parallel_size": 3}, 2, "does not divide the 2 ranks"),
    ({"sequence_parallel_size": 0}, 2, "positive integer"),
    ({"sequence_parallel_size": "2"}, 2, "sequence_parallel_size must be an integer, not \"2\""),
    ({"tensor_parallel": {"autotp_size": 2}}, 2, "vocab_parallel_lm_head to false"),
    ({"tensor_parallel": TP2}, 3, "ZeRO stage 0, 1 or 2"),
    ({"tensor_parallel": 2}, 2, "must be an object"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, extra, stage, message):
    with pytest.raises(UserError, match=message):
        _resolve(tmp_path, stage=stage, **extra)


def test_sequence_parallel_zero3_needs_reduce_scatter(tmp_path):
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["reduce_scatter"] = False
    cfg["sequence_parallel_size"] = 2
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="reduce_scatter"):
        ds_config.resolve(path, 2, 10, "cpu")


GPT2 = AutoConfig.for_model("gpt2", n_head=4, n_embd=64, n_layer=1)
LLAMA = AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                             intermediate_size=176, num_hidden_layers=1)


@pytest.mark.parametrize("plan, config, seq_len, lora, objective, message", [
    (BatchPlan(1, 1, 1, sp=8), GPT2, 64, False, None, "4 attention heads do not divide by 8"),
    (BatchPlan(1, 1, 1, sp=2), GPT2, 65, False, None, "--seq_len 65 does not divide by 2"),
    (BatchPlan(1, 1, 1, sp=2), AutoConfig.for_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
     64, False, None, "3 key-value heads and 2"),
    (BatchPlan(1, 1, 1, sp=2), GPT2, 64, True, None, "not supported with LoRA"),
    (BatchPlan(1, 1, 1, sp=2), GPT2, 64, False, "DPO", "not supported with DPO"),
    (BatchPlan(1, 1, 1, tp=2), GPT2, 64, False, None, "GPT-2 keeps its projections in Conv1D"),
    (BatchPlan(1, 1, 1, tp=4), LLAMA, 64, False, None, "2 key-value heads do not divide by 4"),
    (BatchPlan(1, 1, 1, tp=2), AutoConfig.for_model("gpt_neox"), 64, False, None, "not one these recipes split"),
])
def test_model_checks(plan, config, seq_len, lora, objective, message):
    with pytest.raises(UserError, match=message):
        sequence_tensor.check(plan, config, seq_len, lora, objective)


def test_models_that_split_pass():
    sequence_tensor.check(BatchPlan(1, 1, 1, sp=2), GPT2, 64, False, None)
    sequence_tensor.check(BatchPlan(1, 1, 1, sp=4), GPT2, 64, False, None)
    sequence_tensor.check(BatchPlan(1, 1, 1, tp=2), LLAMA, 64, False, None)


def test_shards_put_back_together_are_the_sample():
    ids = torch.arange(24).view(2, 12)
    targets = ids + 100
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    parts = [sequence_tensor.shard_sequence({"input_ids": ids, "attention_mask": mask}, targets, 3, r) for r in range(3)]
    assert torch.equal(torch.cat([p[0]["input_ids"] for p in parts], 1), ids)
    assert torch.equal(torch.cat([p[1] for p in parts], 1), targets)
    assert torch.equal(torch.cat([p[0]["position_ids"] for p in parts], 1), torch.arange(12).expand(2, 12))
    assert all(p[0][sequence_tensor.SEQUENCE_MASK] is mask for p in parts)  # a packed batch's mask goes whole
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])  # packed: positions restart per example
    local, _ = sequence_tensor.shard_sequence({"input_ids": ids[:1, :6], "position_ids": positions}, targets[:1, :6], 2, 1)
    assert local["position_ids"].tolist() == [[0, 1, 0]] and "attention_mask" not in local


def test_resume_keeps_the_parallel_layout():
    info = {"world_size": 2, "zero_stage": 2, "tensor_parallel": 2}
    assert layout_change(info, 2, 2, sp=1, tp=2) is None
    with pytest.raises(UserError, match="same ranks and DeepSpeed JSON"):
        layout_change(info, 2, 2, sp=1, tp=1)
    with pytest.raises(UserError, match="same ranks"):
        layout_change({"world_size": 2, "zero_stage": 2}, 2, 2, sp=2, tp=1)
    assert "2 ranks at ZeRO-2 -> 1 ranks" in layout_change({"world_size": 2, "zero_stage": 2}, 1, 2)
