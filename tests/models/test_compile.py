"""torch.compile through DeepSpeed: the checks before any rank starts, compiled runs against eager
ones at ZeRO-0 and ZeRO-2, exact resume of a compiled run, and its export."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from gpt_recipes.errors import UserError
from gpt_recipes.metrics.throughput import ThroughputWindow
from gpt_recipes.models import compile as compiling
from gpt_recipes.parallel.layout import EVERY_LAYOUT, Layout, Uses
from tests.helpers import CROSS_STAGE_RUNS, PARITY_STEPS, parity_run, read_metrics

# Inductor's fused kernels sum in another order than eager ones: measured over 20 clipped fp32
# steps on 2 ranks, losses within 9.6e-7 and final weights within 1.1e-5 at every stage.
COMPILE_TOL = 1e-4


def _args(**flags):
    return SimpleNamespace(**{"torch_compile": False, "torch_compile_backend": None, "torch_compile_mode": None,
                              **flags})


def _plan(args, cfg=None, device="cpu"):
    return compiling.plan_compile(args, cfg or {"zero_optimization": {"stage": 2}}, device)


def test_no_flag_no_section_runs_eagerly():
    assert _plan(_args()) is None


def test_the_flag_compiles_with_inductor_by_default():
    plan = _plan(_args(torch_compile=True))
    assert plan == compiling.CompilePlan("inductor", None, deepcompile=False) and plan.kwargs() == {}
    assert _plan(_args(torch_compile=True, torch_compile_mode="max-autotune")).kwargs() == {"mode": "max-autotune"}


@pytest.mark.parametrize("flags, cfg, message", [
    ({}, {"compile": {"enabled": True}}, "compile.enabled is not one of DeepSpeed's compile options"),
    ({"torch_compile": True}, {"compile": {"backend": "inductor"}}, "compile the model with --torch_compile"),
    ({}, {"compile": True}, "compile must be a JSON object"),
    ({"torch_compile_mode": "max-autotune"}, {}, "--torch_compile_mode takes effect with --torch_compile"),
    ({"torch_compile": True, "torch_compile_backend": "nope"}, {}, "'nope' is not a torch.compile backend"),
    ({}, {"compile": {"deepcompile": True}, "zero_optimization": {"stage": 0}}, "works with ZeRO stage 1, 2 or 3"),
    ({}, {"compile": {"deepcompile": True}, "zero_optimization": {"stage": 3}}, "needs CUDA devices"),
    ({"torch_compile": True, "torch_compile_backend": "tvm"}, {}, "'tvm' cannot compile this run: it needs the 'tvm' "
                                                                   "package, which is not installed"),
    ({"torch_compile": True, "torch_compile_backend": "openxla"}, {}, "it needs the 'torch_xla' package"),
    ({"torch_compile": True, "torch_compile_backend": "cudagraphs"}, {}, "it records CUDA graphs, and this run is on cpu"),
])
def test_bad_compile_settings_are_one_line(flags, cfg, message):
    cfg = {"zero_optimization": {"stage": 2}, **cfg}
    with pytest.raises(UserError, match=message):
        _plan(_args(**flags), cfg)


@pytest.mark.parametrize("layout", [Layout(2, 2, sequence=2), Layout(2, 2, tensor=2), Layout(2, 1, pipeline=2)])
def test_sequence_tensor_and_pipeline_parallelism_are_refused_compiled(layout):
    refused = layout.refusal(AutoConfig.for_model("llama"), 64, EVERY_LAYOUT, "pretraining", Uses(compiled=True))
    assert refused.startswith(f"--torch_compile with {layout.what()} is not supported")
    assert layout.refusal(AutoConfig.for_model("llama"), 64, EVERY_LAYOUT, "pretraining", Uses()) is None


def test_compile_time_is_kept_out_of_the_window(monkeypatch):
    """A step that compiled counts as a step, but the time it spent compiling is not in its step_time,
    and compiling during a pause (evaluation) is not taken out twice."""
    import time

    from gpt_recipes.metrics import throughput

    compiled = {"s": 0.0}
    monkeypatch.setattr(throughput, "compile_seconds", lambda: compiled["s"])
    window = ThroughputWindow(1.0, 1, None, 1)
    time.sleep(0.3)
    compiled["s"] = 0.25  # of the 0.3 s step, 0.25 s went to compiling
    window.add_step(10)
    with window.paused():
        time.sleep(0.2)
        compiled["s"] = 0.4  # evaluation compiled too; the pause leaves it out already
    time.sleep(0.1)
    window.add_step(10)
    record = window.record()
    assert record["compile_s"] == 0.4 and window.steps == 2
    assert 0.06 / 2 < record["step_time"] < 0.25 / 2, record  # (0.05 + 0.1) / 2, not (0.3 + 0.1) / 2


# The compiled parity runs: ZeRO-0 (exported) and ZeRO-2, which share inductor's cached kernels. Each
# further stage compiles its own graphs from cold (ZeRO-3: 70 s here), past the suite's budget.
COMPILED = [run for run in CROSS_STAGE_RUNS if run[0] in ("zero0 2x2", "zero2 2x2")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_data, tiny_model):
    """The 2-rank parity runs of ZeRO-0 and ZeRO-2, compiled; the ZeRO-0 one also exported (and
    checked against the engine as every export is); a compiled ZeRO-2 run stopped by SIGTERM."""
    tmp = tmp_path_factory.mktemp("compiled")
    runs = {}
    for label, stage, ranks, micro, accum, fused in COMPILED:
        extra = ["--torch_compile", *(["--export_hf", str(tmp / "hf")] if stage == 0 else [])]
        runs[label] = parity_run(tmp, tiny_data, tiny_model, stage, ranks, micro, accum, fused, label, *extra)
    stopped = parity_run(tmp, tiny_data, tiny_model, 2, 2, 2, 1, True, "zero2 stopped", "--torch_compile",
                         "--save_interval", "10", fault="sigterm@7:1")
    assert "stopped: SIGTERM received: saved a checkpoint at step 8" in (tmp / "zero2_stopped.log").read_text()
    return tmp, runs, stopped


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label, *_ in COMPILED])
def test_compiled_runs_train_as_eager_ones(cross_stage, compiled, label):
    eager, compiled_run = cross_stage[1][label], compiled[1][label]
    (eager_train, eager_eval), (train, evals) = read_metrics(eager), read_metrics(compiled_run)
    assert len(train) == len(eager_train) == PARITY_STEPS
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(train, eager_train))
    val_diff = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(evals, eager_eval))
    wa, wb = consolidated_state_dict(eager / "checkpoints"), consolidated_state_dict(compiled_run / "checkpoints")
    weight_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"{label} compiled vs eager: max |loss diff| {loss_diff:.2e}, |val diff| {val_diff:.2e}, "
          f"|weight diff| {weight_diff:.2e}")
    assert loss_diff < COMPILE_TOL and val_diff < COMPILE_TOL and weight_diff < COMPILE_TOL
    config = json.loads((compiled_run / "config.json").read_text())
    assert config["compile"] == {"backend": "inductor", "mode": None, "deepcompile": False}
    assert max(r.get("compile_s", 0.0) for r in train) > 1.0  # it did compile, and said how long
    log = (compiled_run.parent / f"{compiled_run.name}.log").read_text()
    assert "Compile: torch.compile through DeepSpeed" in log and "compiling took" in log
    assert "recompile_limit" not in log  # nothing fell back to eager


@pytest.mark.slow
def test_a_compiled_run_exports_and_resumes_exactly(compiled, tiny_data, tiny_model):
    tmp, runs, stopped = compiled
    record = [r for r in read_metrics(runs["zero0 2x2"])[0]]  # the export's own check passed, or the run failed
    exported = json.loads((tmp / "hf" / "config.json").read_text())
    assert exported["model_type"] == "gpt2" and record[-1]["step"] == PARITY_STEPS
    parity_run(tmp, tiny_data, tiny_model, 2, 2, 2, 1, True, "zero2 stopped", "--torch_compile", "--save_interval",
               "10", "--resume")
    full, resumed = read_metrics(runs["zero2 2x2"])[0], read_metrics(stopped)[0]
    assert [r["step"] for r in resumed] == list(range(1, PARITY_STEPS + 1))
    for a, b in zip(full, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    wa, wb = consolidated_state_dict(runs["zero2 2x2"] / "checkpoints"), consolidated_state_dict(stopped / "checkpoints")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
