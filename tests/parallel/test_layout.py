"""The parallel layout: what the JSON asks for, what combines with what (one set of rules, used by
the runner and the memory planner alike), what each model and objective can run, and what a
resume on another layout means."""

import json
import re

import pytest
from transformers import AutoConfig

from gpt_recipes import ds_config
from gpt_recipes.errors import UserError
from gpt_recipes.parallel.layout import EVERY_LAYOUT, Layout, Supports, Uses
from tests.helpers import REPO, TINY_GPT2, TINY_LLAMA, TINY_MIXTRAL, resolve_config, run_here

TP2 = {"autotp_size": 2, "vocab_parallel_lm_head": False}
EP2 = {"enabled": True, "autoep_size": 2}


def test_the_layouts_from_the_json(tmp_path):
    _, plan, _ = resolve_config(tmp_path, 4, 2, sequence_parallel_size=2)
    assert (plan.world_size, plan.layout.sequence, plan.layout.tensor, plan.layout.mode) == (2, 2, 1, "sequence")
    assert [plan.data_rank(r) for r in range(4)] == [0, 0, 1, 1]  # a group's ranks read the same samples
    assert plan.global_batch == 2 * plan.micro_batch and plan.grad_divisor == 2
    _, plan, _ = resolve_config(tmp_path, 4, 3, sequence_parallel_size=2)
    assert plan.grad_divisor == 4  # ZeRO-3's reduce-scatter averages over every rank
    _, plan, _ = resolve_config(tmp_path, 2, 2, tensor_parallel=TP2)
    assert (plan.world_size, plan.layout.tensor, plan.global_batch, plan.loss_divisor) == (1, 2, plan.micro_batch, 2)
    _, plan, _ = resolve_config(tmp_path, 4, 1, pipeline={"stages": 2}, gradient_accumulation_steps=4)
    assert (plan.layout.pipeline, plan.world_size, plan.global_batch) == (2, 2, 2 * 4 * plan.micro_batch)
    # DeepSpeed numbers ranks stage-major: ranks 0, 1 are stage 0 of pipelines 0, 1.
    assert [plan.data_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert (plan.layout.partition, plan.layout.activation_checkpoint_interval) == ("parameters", 0)  # "best"
    shipped = json.loads((REPO / "ds_configs" / "zero1_pp2.json").read_text())
    assert Layout.of_config(shipped, 2).pipeline == 2
    assert Layout.of_config({}, 3) == Layout(world=3)


@pytest.mark.parametrize("extra, stage, world, message", [
    ({"sequence_parallel_size": 2, "tensor_parallel": TP2}, 2, 2, "one of them at a time"),
    ({"sequence_parallel_size": 3}, 2, 2, "sequence_parallel_size 3 does not divide the 2 ranks"),
    ({"sequence_parallel_size": 0}, 2, 2, "positive integer"),
    ({"sequence_parallel_size": "2"}, 2, 2, "sequence_parallel_size must be an integer, not \"2\""),
    ({"tensor_parallel": {"autotp_size": 2}}, 2, 2, "vocab_parallel_lm_head to false"),
    ({"tensor_parallel": TP2}, 3, 2, "ZeRO stage 0, 1 or 2"),
    ({"tensor_parallel": 2}, 2, 2, "must be an object"),
    ({"sequence_parallel_size": 2, "zero_optimization": {"stage": 3, "reduce_scatter": False}}, 3, 2,
     "reduce_scatter true"),
    ({"pipeline": {"stages": 2}}, 2, 2, "runs with ZeRO stage 0 or 1, not 2"),
    ({"pipeline": {"stages": 2}}, 3, 2, "runs with ZeRO stage 0 or 1, not 3"),
    ({"pipeline": {"stages": 2}, "sequence_parallel_size": 2}, 1, 4, "data parallelism only"),
    ({"pipeline": {"stages": 2}, "tensor_parallel": {"autotp_size": 2}}, 1, 4, "data parallelism only"),
    ({"pipeline": {"stages": 3}}, 1, 2, "pipeline.stages 3 does not divide the 2 ranks"),
    ({"pipeline": {"stages": "2"}}, 1, 2, "pipeline.stages must be a positive integer"),
    ({"pipeline": {"stages": 2, "partition": "layers"}}, 1, 2, "is not one of parameters, uniform or type:REGEX"),
    # DeepSpeed's AutoEP: what it does not combine with, before any rank starts.
    ({"expert_parallel": {**EP2, "load_balance_coeff": 0.01}}, 2, 2, "load_balance_coeff is not supported"),
    ({"expert_parallel": EP2, "pipeline": {"stages": 2}}, 1, 4, "expert parallelism with data parallelism only"),
    ({"expert_parallel": EP2, "sequence_parallel_size": 2}, 2, 4, "expert parallelism with data parallelism only"),
    ({"expert_parallel": EP2, "tensor_parallel": TP2}, 2, 4, "expert parallelism with data parallelism only"),
    ({"expert_parallel": {**EP2, "expert_tensor_parallel_size": 2}}, 2, 2, "only 1 is supported"),
    ({"expert_parallel": {"enabled": True, "autoep_size": 3}}, 2, 2, "autoep_size 3 does not divide the 2 ranks"),
    ({"expert_parallel": {"enabled": True, "autoep_size": 0}}, 2, 2, "must be a positive integer"),
    ({"expert_parallel": {**EP2, "comm_backend": "deepep"}}, 2, 2, "runs on GPUs with DeepEP only"),
    ({"expert_parallel": True}, 2, 2, "expert_parallel must be an object"),
])
def test_layouts_that_cannot_combine_are_one_line_errors(tmp_path, extra, stage, world, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_config(tmp_path, world, stage, **extra)


GPT2 = AutoConfig.for_model("gpt2", n_head=4, n_embd=64, n_layer=1)
LLAMA = AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                             intermediate_size=176, num_hidden_layers=1)
SP2, SP8, TP2_, TP4 = Layout(2, 2, sequence=2), Layout(8, 2, sequence=8), Layout(2, 2, tensor=2), Layout(4, 2, tensor=4)
PP2, PP3 = Layout(2, 1, pipeline=2), Layout(3, 1, pipeline=3)
NOT_PP = Supports(sequence=True, tensor=True, why_not="batches vary in length")


TINY = AutoConfig.for_model(**TINY_GPT2)


@pytest.mark.parametrize("layout, config, seq_len, supports, uses, message", [
    (SP8, GPT2, 64, EVERY_LAYOUT, Uses(), "4 attention heads do not divide by 8"),
    (SP2, GPT2, 65, EVERY_LAYOUT, Uses(), "--seq_len 65 does not divide by 2"),
    (SP2, AutoConfig.for_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 64,
     EVERY_LAYOUT, Uses(), "3 key-value heads and 2"),
    (SP2, GPT2, 64, EVERY_LAYOUT, Uses(adapters=True), "not supported with LoRA"),
    (SP2, AutoConfig.for_model("gemma3_text", num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                               num_hidden_layers=2), 128, EVERY_LAYOUT, Uses(),
     "sliding-window attention (16 tokens) is not kept by DeepSpeed Ulysses"),
    (SP2, AutoConfig.for_model("mistral", sliding_window=64), 128, EVERY_LAYOUT, Uses(), "(64 tokens)"),
    (SP2, GPT2, 64, Supports(why_not="pairs are scored whole"), Uses(),
     "is not supported with DPO (pairs are scored whole)"),
    (TP2_, GPT2, 64, EVERY_LAYOUT, Uses(), "GPT-2 keeps its projections in Conv1D"),
    (TP4, LLAMA, 64, EVERY_LAYOUT, Uses(), "2 key-value heads do not divide by 4"),
    (TP2_, AutoConfig.for_model("gpt_neox"), 64, EVERY_LAYOUT, Uses(), "not one these recipes split"),
    (PP2, GPT2, 64, NOT_PP, Uses(), "a pipeline (pipeline.stages 2) is not supported with DPO (batches vary"),
    (PP2, GPT2, 64, EVERY_LAYOUT, Uses(adapters=True), "LoRA"),
    (PP2, GPT2, 64, EVERY_LAYOUT, Uses(compiled=True), "--torch_compile"),
    (PP2, TINY, 64, EVERY_LAYOUT, Uses(downstream_eval=True), "evaluate the export with tools/evaluate.py"),
    (PP2, TINY, 64, EVERY_LAYOUT, Uses(activation_checkpointing=True), "set pipeline.activation_checkpoint_interval"),
    (PP2, AutoConfig.for_model("gpt_neox"), 64, EVERY_LAYOUT, Uses(), "gpt2 and llama families"),
    (PP3, TINY, 64, EVERY_LAYOUT, Uses(), "at least one decoder block per stage; the model has 2"),
    (Layout(2, 1, pipeline=2, partition="type:GPT2Block"), TINY, 64, EVERY_LAYOUT, Uses(),
     "matches 0 of the pipeline's layers, fewer than its 2 stages; the layers' classes are Embedding, Positions, "
     "Block, Norm (type:Block cuts between decoder blocks)"),
    (Layout(2, 1, pipeline=2, partition="type:nosuch"), TINY, 64, EVERY_LAYOUT, Uses(), "matches 0 of"),
    (Layout(2, 1, pipeline=2, partition="type:Norm"), TINY, 64, EVERY_LAYOUT, Uses(), "matches 1 of"),
    (Layout(2, 1, pipeline=2, partition="type:(block"), TINY, 64, EVERY_LAYOUT, Uses(), "is not a regular expression"),
])
def test_what_a_layout_cannot_run(layout, config, seq_len, supports, uses, message):
    assert message in layout.refusal(config, seq_len, supports, "DPO", uses)


@pytest.mark.parametrize("config", [
    AutoConfig.for_model("gemma3_text", num_attention_heads=4, num_key_value_heads=2, sliding_window=128),
    AutoConfig.for_model("mistral", sliding_window=None),
    AutoConfig.for_model("qwen2", sliding_window=16, use_sliding_window=False),
])
def test_sequence_parallelism_takes_a_window_no_shorter_than_the_sequence(config):
    assert SP2.refusal(config, 128, EVERY_LAYOUT, "pretraining") is None


MIXTRAL = AutoConfig.for_model(**TINY_MIXTRAL)  # 4 experts
EXPERTS = Supports(experts=True)


@pytest.mark.parametrize("layout, config, supports, uses, message", [
    (Layout(2, 2, expert=2, autoep=True), TINY, EVERY_LAYOUT, Uses(), "model type 'gpt2' has no experts"),
    (Layout(3, 2, expert=3, autoep=True), MIXTRAL, EVERY_LAYOUT, Uses(), "autoep_size 3 does not divide the model's 4"),
    (Layout(2, 2), MIXTRAL, Supports(), Uses(), "mixture-of-experts models are not supported with DPO yet"),
    (Layout(2, 2, expert=2, autoep=True), MIXTRAL, EXPERTS, Uses(adapters=True), "LoRA (--use_peft) on a mixture"),
    (Layout(2, 2), MIXTRAL, EXPERTS, Uses(compiled=True), "--torch_compile with a mixture-of-experts model"),
    (SP2, MIXTRAL, EVERY_LAYOUT, Uses(), "with a mixture-of-experts model: these recipes run MoE models with data "
                                         "and expert parallelism"),
])
def test_what_experts_cannot_run(layout, config, supports, uses, message):
    assert message in layout.refusal(config, 64, supports, "DPO", uses)


def test_experts_run_with_data_and_expert_parallelism():
    for layout in (Layout(2, 3), Layout(2, 1, expert=2, autoep=True), Layout(4, 2, expert=4, autoep=True)):
        assert layout.refusal(MIXTRAL, 64, EVERY_LAYOUT, "pretraining") is None
    assert Layout.of_config({"expert_parallel": EP2}, 4) == Layout(4, 0, expert=2, autoep=True)
    assert Layout.of_config({"expert_parallel": {"enabled": True}}, 1).autoep  # AutoEP's names at size 1 too
    assert Layout.of_config({"expert_parallel": {"enabled": False, "autoep_size": 2}}, 2) == Layout(2)


def test_a_resume_across_expert_parallel_sizes():
    ep2 = Layout(2, 2, expert=2, autoep=True)
    assert ep2.resume_change(ep2) is None
    assert ep2.resume_change(Layout.from_record(ep2.record())) is None
    assert "2 ranks at ZeRO-2, experts over 2 -> 1 ranks at ZeRO-2" == Layout(1, 2, autoep=True).resume_change(ep2)
    with pytest.raises(UserError, match="enables expert_parallel"):
        Layout(1, 2).resume_change(ep2)
    with pytest.raises(UserError, match="leaves expert_parallel off"):
        ep2.resume_change(Layout(2, 2))


def test_what_a_layout_can_run():
    for layout, config in ((SP2, GPT2), (Layout(4, 2, sequence=4), GPT2), (TP2_, LLAMA), (PP2, TINY),
                           (Layout(2, 1, pipeline=2, partition="type:Block"), TINY),
                           (Layout(2, 1, pipeline=2, partition="type:block"), AutoConfig.for_model(**TINY_LLAMA)),
                           (Layout(2, 3), GPT2)):
        assert layout.refusal(config, 64, EVERY_LAYOUT, "pretraining") is None, (layout, config.model_type)
    assert SP2.refusal(GPT2, 64, EVERY_LAYOUT, "fine-tuning", Uses(downstream_eval=True)) is None


def test_a_resume_keeps_a_sequence_tensor_or_pipeline_layout():
    tp = Layout.from_record({"world_size": 2, "zero_stage": 2, "tensor_parallel": 2})
    assert Layout(2, 2, tensor=2).resume_change(tp) is None
    with pytest.raises(UserError, match="same ranks and DeepSpeed JSON"):
        Layout(2, 2).resume_change(tp)
    with pytest.raises(UserError, match="same ranks"):
        Layout(2, 2, sequence=2).resume_change(Layout(2, 2))
    pp = Layout.from_record({"world_size": 2, "zero_stage": 1, "pipeline_stages": 2})
    with pytest.raises(UserError, match="resume a pipeline run with the same ranks"):
        Layout(2, 1).resume_change(pp)
    assert Layout(2, 1, pipeline=2).resume_change(pp) is None
    assert Layout(1, 2).resume_change(Layout(2, 2)) == "2 ranks at ZeRO-2 -> 1 ranks at ZeRO-2"
    assert Layout(2, 2).resume_change(Layout(2, 3)) == "2 ranks at ZeRO-3 -> 2 ranks at ZeRO-2"
    for saved, now in ((2, 3), (2, 0), (0, 2), (1, 3)):  # what DeepSpeed's universal checkpoint fails here
        with pytest.raises(UserError, match=f"written at ZeRO-{saved}; resuming it at ZeRO-{now} is not among the "
                                            "changes"):
            Layout(2, now).resume_change(Layout(2, saved))
    assert Layout.from_record(Layout(4, 1, pipeline=2).record()) == Layout(4, 1, pipeline=2)


def test_the_planner_refuses_what_the_runner_refuses(tmp_path):
    """tools/plan_memory.py leaves out each JSON the recipes refuse, in the runner's words: the layout
    rules exist once. Every combination below is planned and then checked as a run would check it."""
    from gpt_recipes.train.lm import NextToken

    configs = {"sp4": {"sequence_parallel_size": 4}, "tp2": {"tensor_parallel": TP2}, "pp2": {"pipeline": {"stages": 2}},
               "pp2z2": {"pipeline": {"stages": 2}, "zero_optimization": {"stage": 2}}, "dp": {}}
    base = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    for name, extra in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**base, **extra}))
    for model, seq_len in (("gpt2-nano", 64), ("llama-nano", 64), ("gpt2-nano", 66)):
        proc = run_here("tools/plan_memory.py", ["--model", model, "--ranks", "4", "--seq_len", str(seq_len),
                                                   "--configs", str(tmp_path / "*.json")])
        out = proc.stdout + proc.stderr
        config = __import__("gpt_recipes.models.causal_lm", fromlist=["build_config"]).build_config(model, 8192, 0)
        for name in configs:
            cfg = ds_config.load_config(tmp_path / f"{name}.json")
            try:
                refused = Layout.of_config(cfg, 4).refusal(config, seq_len, NextToken().supports, "pretraining")
            except UserError as err:
                refused = str(err)
            if refused:
                assert f"{name}: left out" in out and refused in out, (name, model, refused, out)
            else:
                assert f"{name}: left out" not in out and re.search(rf"^{name}\s", out, re.M), (name, model, out)
