"""The memory planner: the ZeRO accounting by hand, and predictions against measured runs."""

import json
import re

import pytest

from gpt_recipes.metrics.memory_plan import (
    MemoryConfig,
    ModelSizes,
    activation_bytes,
    estimate,
    model_sizes,
    plan,
    recommend,
    tensor_parallel_slice,
)
from gpt_recipes.models.causal_lm import build_config
from gpt_recipes.parallel.layout import Layout
from tests.helpers import REPO, launch, read_metrics


def layout(stage, precision="bf16", offload=False, offload_param=False, bucket=50_000_000, micro=1):
    return MemoryConfig(f"zero{stage}", stage, precision, offload, offload_param, micro, bucket, 100_000)


PSI = 1_000_000_000
BIG = ModelSizes((PSI // 2, PSI // 2))  # no parameter below the persistence threshold


@pytest.mark.parametrize("ranks", [2, 8])
def test_model_states_follow_the_zero_paper(ranks):
    """Mixed precision with Adam: 16 bytes/param at stage 0, 2+14/N at stage 2, 16/N (+ bucket) at stage 3."""
    states = {s: estimate(layout(s), BIG, ranks, activations=0).model_states for s in range(4)}
    assert states[0] == 16 * PSI
    assert states[2] == pytest.approx(2 * PSI + 14 * PSI / ranks)
    assert states[1] == states[2]  # DeepSpeed's stage 1 partitions the gradients as well
    assert states[3] == pytest.approx(16 * PSI / ranks + 2 * 50_000_000)
    fp32 = estimate(layout(0, "fp32"), BIG, ranks, 0)
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * PSI, 4 * PSI, 8 * PSI)


def test_offload_moves_optimizer_state_to_the_host():
    """The host holds the optimizer state and the fp32 gradients it steps on (this rank's partition)."""
    on_device = estimate(layout(2), BIG, 4, 0)
    offloaded = estimate(layout(2, offload=True), BIG, 4, 0)
    assert on_device.optimizer == 12 * PSI / 4
    assert offloaded.optimizer == 0 and offloaded.host == on_device.optimizer + 4 * PSI / 4
    z3 = estimate(layout(3, offload=True, offload_param=True), BIG, 4, 0)
    assert z3.params == 2 * (PSI // 2) and z3.host == pytest.approx((12 + 4 + 2) * PSI / 4)


def test_stage3_keeps_small_parameters_whole():
    sizes = ModelSizes((PSI, 1000, 1000))
    z3 = estimate(layout(3), sizes, 4, 0)
    assert z3.params == pytest.approx(2 * (2000 + PSI / 4))


def test_tensor_parallel_splits_the_projections_and_partitions_over_data_parallel_ranks():
    sizes = ModelSizes((PSI // 2, PSI // 2), projections=PSI // 2)  # half the parameters are projections
    tp2 = estimate(MemoryConfig("tp", 2, "bf16", False, False, 1, 0, 0, Layout(4, 2, tensor=2)), sizes, 4, 0)
    kept = PSI - PSI // 4  # the other half whole, and half of the projections
    assert tp2.params == 2 * kept
    assert tp2.optimizer == pytest.approx(12 * kept / 2)  # ZeRO over 4 / 2 data-parallel ranks
    sp2 = estimate(MemoryConfig("sp", 2, "bf16", False, False, 1, 0, 0, Layout(4, 2, sequence=2)), sizes, 4, 0)
    assert sp2.model_states == estimate(layout(2), sizes, 4, 0).model_states  # as data parallelism over all ranks


def test_expert_parallel_ranks_hold_their_experts_and_partition_them_over_their_replicas():
    """Half the parameters are experts; over 4 expert-parallel ranks of 8 a rank holds a quarter of them,
    and ZeRO partitions each expert over the 2 ranks that hold it: 1/8 of the experts' states, as without."""
    sizes = ModelSizes((PSI // 2, PSI // 2), experts=PSI // 2)
    ep = {s: estimate(MemoryConfig("ep", s, "bf16", False, False, 1, 0, 0, Layout(8, s, expert=4, autoep=True)),
                      sizes, 8, 0) for s in (0, 2)}
    held = PSI // 2 + PSI // 8
    assert (ep[0].params, ep[0].grads, ep[0].optimizer) == (2 * held, 2 * held, 12 * held)
    dp = estimate(layout(2), sizes, 8, 0)
    assert ep[2].params == 2 * held and (ep[2].grads, ep[2].optimizer) == (dp.grads, dp.optimizer)
    assert model_sizes(build_config("mixtral-nano", 8192, 0)).experts == 4 * 8 * 3 * 256 * 344


def test_a_pipeline_stage_holds_its_layers_and_its_micro_batches_in_flight():
    config = build_config("gpt2-nano", 1024, 0)
    sizes = model_sizes(config)
    embedding = 1024 * config.n_embd
    # Layers: embedding, positions, 4 blocks, final norm, and the tied head: a second copy of the embedding.
    assert len(sizes.layers) == 8 and sizes.layers[-1] == sizes.layers[0] == embedding
    assert sum(sizes.layers) == sizes.total + embedding
    stages = sizes.stage_parameters(2, "parameters")
    assert sum(stages) == sum(sizes.layers) and max(stages) < 0.6 * sum(sizes.layers)  # balanced by parameters
    pp2 = estimate(MemoryConfig("pp", 1, "bf16", False, False, 1, 0, 0, Layout(4, 1, pipeline=2), grad_accum=4), sizes, 4,
                   0)
    assert pp2.params == 2 * max(stages) and pp2.optimizer == pytest.approx(12 * max(stages) / 2)  # ZeRO over 4 / 2
    # 1F1B: stage 0 keeps min(m, P) = 2 micro-batches of its blocks' activations, the last stage 1.
    factor = sizes.pipeline_activation_factor(2, "parameters", 4)
    assert factor == pytest.approx(2 * 0.5) and sizes.pipeline_activation_factor(2, "parameters", 1) == 0.5
    from gpt_recipes.parallel.pipeline import bubble

    assert [round(bubble(2, m), 4) for m in (2, 4, 8)] == [round(1 / 3, 4), 0.2, round(1 / 9, 4)]


def test_a_parallel_rank_traces_its_part_of_the_activations():
    llama = build_config("llama-nano", 1024, 0)
    whole = activation_bytes(llama, 1, 128, "bf16", fused_loss=False)
    assert activation_bytes(llama, 1, 64, "bf16", fused_loss=False) == pytest.approx(whole / 2, rel=0.05)  # SP=2
    part = tensor_parallel_slice(llama, 2)
    assert (part.num_attention_heads, part.num_key_value_heads, part.head_dim) == (2, 2, 64)
    assert 0.5 * whole < activation_bytes(part, 1, 128, "bf16", fused_loss=False) < 0.9 * whole  # TP=2
    assert sum(model_sizes(part).numels) < sum(model_sizes(llama).numels)
    assert model_sizes(llama).projections == 4 * (4 * 256 * 256 + 3 * 256 * 688)


def test_traced_activations_scale_and_shrink_with_checkpointing(tiny_model):
    config = build_config(str(tiny_model), 1024, 0)
    one = activation_bytes(config, 1, 64, "bf16", fused_loss=False)
    assert activation_bytes(config, 4, 64, "bf16", fused_loss=False) == pytest.approx(4 * one, rel=0.01)
    assert activation_bytes(config, 1, 64, "fp32", fused_loss=False) > 1.5 * one
    assert activation_bytes(config, 1, 64, "bf16", checkpointing=True, fused_loss=False) < 0.7 * one


def test_traced_activations_of_the_fused_loss(tiny_model):
    """The fused loss keeps the output weight's gradient (vocab x width, once per micro-batch)
    and the hidden states' gradient instead of the logits' log-softmax."""
    config = build_config(str(tiny_model), 1024, 0)
    vocab, width, tokens = 1024, config.n_embd, 4 * 64
    plain = activation_bytes(config, 4, 64, "bf16", fused_loss=False)
    fused = activation_bytes(config, 4, 64, "bf16", fused_loss=True)
    # plain keeps the fp32 log-softmax of the logits (4 bytes per logit) and the final hidden
    # states; fused keeps the bf16 gradients of the output weight and of the hidden states
    assert plain - fused == pytest.approx(tokens * vocab * 4 - vocab * width * 2, rel=0.02)


def test_recommendation_prefers_least_communication_that_fits():
    sizes = ModelSizes((PSI,))
    layouts = [layout(0), layout(2), layout(3)]
    gib = 2**30
    rows = plan(layouts, sizes, 0, ranks_per_node=8, nodes=1, device_memory=16 * gib, host_memory=1000 * gib)
    assert [r.fits for r in rows] == [False, True, True] and recommend(rows).estimate.layout.stage == 2
    rows = plan(layouts, sizes, 0, ranks_per_node=8, nodes=1, device_memory=2 * gib, host_memory=1000 * gib)
    assert recommend(rows) is None


def test_offloading_fits_only_where_the_host_holds_it_by_both_estimates():
    gib = 2**30
    offload = layout(3, offload=True, offload_param=True)
    rows = plan([layout(3), offload], BIG, 0, ranks_per_node=8, nodes=1, device_memory=80 * gib, host_memory=None)
    assert [r.verdict for r in rows] == ["yes", "yes*"]  # no host memory given: the offloading row says so
    assert recommend(rows).estimate.layout is rows[0].estimate.layout
    ours, deepspeeds = 8 * rows[1].estimate.host, rows[1].deepspeed[1]
    assert deepspeeds > ours  # DeepSpeed counts a 1.5x buffer factor on the host
    assert rows[1].host_need == deepspeeds
    between = (ours + deepspeeds) / 2  # our estimate alone would fit
    rows = plan([offload], BIG, 0, ranks_per_node=8, nodes=1, device_memory=80 * gib, host_memory=between)
    assert rows[0].verdict == "no"
    rows = plan([offload], BIG, 0, ranks_per_node=8, nodes=1, device_memory=80 * gib, host_memory=2 * deepspeeds)
    assert rows[0].verdict == "yes"
    with pytest.raises(ValueError):
        plan([offload], BIG, 0, ranks_per_node=2, nodes=1, device_memory=None, host_memory=None)


# A model whose matrices exceed ZeRO-3's persistence threshold, so every stage partitions it.
MID_GPT2 = {"model_type": "gpt2", "n_layer": 4, "n_embd": 512, "n_head": 8, "n_positions": 128,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
MEASURED_TOL = 0.10  # relative; the measurement also counts the batch and a few small tensors


@pytest.fixture(scope="session")
def mid_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "mid_gpt2.json"
    path.write_text(json.dumps(MID_GPT2))
    return path


@pytest.fixture(scope="session")
def zero3_monitored_run(tmp_path_factory, tiny_data, mid_model):
    """A 2-rank ZeRO-3 run with activation checkpointing, TensorBoard and CSV monitors."""
    tmp = tmp_path_factory.mktemp("zero3_monitored")
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, tensorboard={"enabled": True}, csv_monitor={"enabled": True})
    (tmp / "ds.json").write_text(json.dumps(cfg))
    out = tmp / "run"
    launch("recipes/pretrain.py", ["--deepspeed_config", str(tmp / "ds.json"), "--data", str(tiny_data), "--model",
                                   str(mid_model), "--seq_len", "128", "--output_dir", str(out), "--max_steps", "4",
                                   "--log_interval", "2", "--eval_batches", "1", "--activation_checkpointing"])
    return tmp / "ds.json", out


def _measured(out):
    line = next(r for r in read_metrics(out)[0] if "model_state_mb" in r)
    return line["model_state_mb"] * 2**20, line["activation_mb"] * 2**20


def _predicted(cfg_path, mid_model, checkpointing):
    config = build_config(str(mid_model), 1024, 0)
    lay = MemoryConfig.from_config("measured", json.loads(cfg_path.read_text()), 2)
    acts = activation_bytes(config, lay.micro_batch, 128, lay.precision, checkpointing, fused_loss=lay.stage < 3)
    return estimate(lay, model_sizes(config), 2, acts)


@pytest.mark.slow
def test_planner_matches_a_measured_zero1_run(tmp_path, tiny_data, mid_model):
    cfg = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    launch("recipes/pretrain.py", ["--deepspeed_config", str(tmp_path / "ds.json"), "--data", str(tiny_data),
                                   "--model", str(mid_model), "--seq_len", "128", "--output_dir", str(out),
                                   "--max_steps", "2", "--log_interval", "2", "--eval_batches", "1"])
    states, acts = _measured(out)
    predicted = _predicted(tmp_path / "ds.json", mid_model, checkpointing=False)
    assert states == pytest.approx(predicted.model_states, rel=MEASURED_TOL)
    assert acts == pytest.approx(predicted.activations, rel=MEASURED_TOL)


@pytest.mark.slow
def test_planner_matches_a_measured_zero3_run_with_checkpointing(zero3_monitored_run, mid_model):
    cfg_path, out = zero3_monitored_run
    states, acts = _measured(out)
    predicted = _predicted(cfg_path, mid_model, checkpointing=True)
    assert states == pytest.approx(predicted.model_states, rel=MEASURED_TOL)
    assert acts == pytest.approx(predicted.activations, rel=MEASURED_TOL)


@pytest.mark.slow
def test_zero3_builds_the_model_partitioned(zero3_monitored_run):
    """Right after construction each rank holds about half the model (2 ranks), never all of it."""
    _, out = zero3_monitored_run
    run = json.loads((out / "config.json").read_text())
    whole_mb = run["parameters"] * 4 / 2**20
    assert run["built_mb"] < 0.6 * whole_mb


@pytest.mark.slow
def test_tensorboard_and_csv_monitors_record_the_metrics(zero3_monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = zero3_monitored_run
    events = EventAccumulator(str(out / "monitor" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_sec", "eval/val_loss"} <= tags
    train = [r for r in read_metrics(out)[0]]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert (out / "monitor" / "csv_monitor" / "train_tokens_per_sec.csv").stat().st_size > 0


@pytest.mark.slow
def test_plan_memory_tool(tmp_path, monkeypatch, capsys):
    """The tool's main, in this process (one import of DeepSpeed for all six cases)."""
    import runpy
    import sys
    from types import SimpleNamespace

    def plan(*args):
        monkeypatch.setattr(sys, "argv", ["plan_memory.py", *args])
        code = 0
        try:
            runpy.run_path(str(REPO / "tools" / "plan_memory.py"), run_name="__main__")
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    proc = plan("--model", "gpt2-medium", "--ranks", "2", "--seq_len", "256", "--micro_batch", "1", "--host_mem", "24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zero3 " in proc.stdout and "Recommended: ds_configs/zero0.json" in proc.stdout
    # An ordinary run that does not fit at micro-batch 8: plain data parallelism with a smaller
    # micro-batch is recommended; sequence parallelism, which fits as it is, only mentioned.
    proc = plan("--model", "gpt2-medium", "--ranks", "2", "--host_mem", "24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Recommended: plain data parallelism, ds_configs/zero1.json with --ds train_micro_batch_size_per_gpu=4" \
        in proc.stdout, proc.stdout
    assert re.search(r"ds_configs/zero2_sp2\S*.json fits as it is, splitting each sample over 2 ranks .*worth it only "
                     r"when data parallelism does not fit", proc.stdout), proc.stdout
    # Sequence parallelism recommended where data parallelism cannot fit even at micro-batch 1 with
    # activation checkpointing: what it does to the global batch is said.
    proc = plan("--model", "llama-nano-64k", "--ranks", "2", "--seq_len", "32768", "--host_mem", "4")
    assert "Recommended: ds_configs/zero2_sp2" in proc.stdout and "plain data parallelism" not in proc.stdout
    assert "1/2 of what the same batch keys give a data-parallel config" in proc.stdout
    proc = plan("--model", "gpt2-xl", "--ranks", "2", "--host_mem", "8")
    assert proc.returncode == 0 and "Nothing fits" in proc.stdout
    proc = plan("--model", "gpt2-large", "--ranks", "8", "--gpu_mem", "16", "--micro_batch", "1", "--host_mem", "8",
                "--configs", str(REPO / "ds_configs" / "zero3_offload.json"))
    assert proc.returncode == 0 and "Nothing fits" in proc.stdout
    assert "zero3_offload fits the GPUs but not the host memory (8 GiB per node)" in proc.stdout, proc.stdout
    proc = plan("--configs", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    proc = plan("--model", "gpt2-nano", "--ranks", "2", "--configs", str(REPO / "ds_configs" / "zero2_tp2.json"))
    assert proc.returncode == 2 and "GPT-2 keeps its projections in Conv1D layers" in proc.stdout, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: none of the configs can run gpt2-nano")

def test_lora_plans_weights_for_the_frozen_base_and_full_states_for_the_adapters(tmp_path):
    from gpt_recipes.args import AdapterArgs
    from gpt_recipes.models.adapters import lora_config
    from tests.helpers import TINY_GPT2

    adapters_only = ModelSizes((PSI, PSI // 100), trainable_numels=(PSI // 100,))
    e = estimate(layout(2), adapters_only, 2, 0.0)
    assert e.params == 2 * adapters_only.total
    assert e.grads == 2 * PSI // 100 / 2 and e.optimizer == 12 * PSI // 100 / 2
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_GPT2))
    config = build_config(str(path), vocab_size=512, eos_token_id=0)
    lora = lora_config(AdapterArgs(use_peft=True, lora_r=4), config, "tiny")
    sizes = model_sizes(config, lora)
    # Per block, r x (in + out) for c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64.
    assert sizes.trainable == 2 * 4 * (256 + 128 + 320 + 320)
    assert sizes.total == model_sizes(config).total + sizes.trainable


@pytest.mark.parametrize("batch, micro", [
    ({"train_batch_size": 64}, 32),  # the recipe derives micro-batch 32 on 2 ranks, so the planner does
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}, 16),
])
def test_the_planner_resolves_the_batch_as_the_recipe_does(tmp_path, monkeypatch, capsys, batch, micro):
    import runpy
    import sys

    from gpt_recipes import ds_config

    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for key in ds_config.BATCH_KEYS:
        cfg.pop(key, None)
    cfg.update(batch)
    path = tmp_path / "only_global.json"
    path.write_text(json.dumps(cfg))
    assert ds_config.resolve(path, 2, 10, "cpu")[1].micro_batch == micro  # what the recipe would run
    monkeypatch.setattr(sys, "argv", ["plan_memory.py", "--model", "gpt2-nano", "--ranks", "2", "--configs", str(path)])
    runpy.run_path(str(REPO / "tools" / "plan_memory.py"), run_name="__main__")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("only_global"))
    assert int(row.split()[9]) == micro, row
