"""Interrupted runs: preemption, a kill in the middle of a save, a NaN; each then resumed or stopped cleanly."""

import json
import os

import pytest
from launch import launch, read_metrics
from test_pretrain import ds_json, pretrain_args

from gpt_recipes.checkpoint import consolidated_state_dict, is_complete

pytestmark = pytest.mark.slow

STEPS = 12
# fp32, same world size and stage: losses after the resume match to 1e-6; final weights to 1e-5
# (ZeRO-3 came back 1.2e-6 apart here; ZeRO-2 bit-identical).
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-5


def _run(tmp, stage, data, model, out, fault=None, check=True, extra=()):
    args = pretrain_args(ds_json(tmp, stage, micro=2, fp32=True), data, model, out, STEPS, "--log_interval", "1",
                         "--save_interval", "3", "--eval_interval", "0", *extra)
    if fault:
        os.environ["GPT_RECIPES_FAULT"] = fault
    try:
        return launch("recipes/pretrain.py", args, check=check)
    finally:
        os.environ.pop("GPT_RECIPES_FAULT", None)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def reference(request, tmp_path_factory, tiny_data, tiny_model):
    """An uninterrupted 2-rank fp32 run of STEPS steps, checkpointing every 3."""
    tmp = tmp_path_factory.mktemp(f"reference{request.param}")
    _run(tmp, request.param, tiny_data, tiny_model, tmp / "run")
    return request.param, tmp / "run"


def _same_as_reference(out, reference_out, from_step):
    ref, got = read_metrics(reference_out)[0], read_metrics(out)[0]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one line per step, none twice
    for a, b in zip(ref[from_step:], got[from_step:]):
        assert abs(a["loss"] - b["loss"]) < LOSS_TOL and a["lr"] == b["lr"] and a["tokens"] == b["tokens"], (a, b)
    wa, wb = consolidated_state_dict(reference_out / "checkpoints"), consolidated_state_dict(out / "checkpoints")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_TOL


def test_sigterm_on_one_rank_saves_then_resumes_exactly(tmp_path, reference, tiny_data, tiny_model):
    stage, reference_out = reference
    out = tmp_path / "run"
    proc = _run(tmp_path, stage, tiny_data, tiny_model, out, fault="sigterm@5:1", check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]  # 128 + SIGTERM, for schedulers to requeue
    assert "stopped: SIGTERM received: saved a checkpoint at step 5" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step5"
    _run(tmp_path, stage, tiny_data, tiny_model, out, extra=["--resume"])
    _same_as_reference(out, reference_out, from_step=5)


def test_kill_during_save_never_leaves_latest_on_a_partial_checkpoint(tmp_path, reference, tiny_data, tiny_model):
    stage, reference_out = reference
    if stage == 3:
        pytest.skip("one stage is enough for this path")
    out = tmp_path / "run"
    proc = _run(tmp_path, stage, tiny_data, tiny_model, out, fault="kill_in_save@6", check=False)
    assert proc.returncode != 0
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3" and is_complete(ckpt / "step3")
    assert (ckpt / "step6").is_dir() and not is_complete(ckpt / "step6")  # shards written, never completed
    _run(tmp_path, stage, tiny_data, tiny_model, out, extra=["--resume", "--keep_last", "2"])
    _same_as_reference(out, reference_out, from_step=3)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step12", "step9"]  # rotated


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, reference, tiny_data, tiny_model):
    stage, _ = reference
    if stage == 3:
        pytest.skip("one stage is enough for this path")
    out = tmp_path / "run"
    proc = _run(tmp_path, stage, tiny_data, tiny_model, out, fault="nan@5", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert ("error: the training loss became NaN or infinite between steps 4 and 5; the last good checkpoint, "
            "step3, is kept") in proc.stderr
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3" and not (ckpt / "step6").exists()
    assert json.loads((ckpt / "step3" / "training.json").read_text())["step"] == 3
