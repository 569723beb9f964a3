"""Real multi-rank pretraining runs on CPU (gloo): loss falls, data-parallel parity, resume."""

import json
import re

import pytest
import torch
from launch import REPO, launch, read_metrics, run_python

from gpt_recipes.checkpoint import consolidated_state_dict

pytestmark = pytest.mark.slow

STAGES = [0, 1, 2, 3]
# fp32 data-parallel parity is at rounding level: summation order differs between one rank
# with a larger batch and two ranks whose gradients are averaged by all-reduce.
PARITY_TOL = 1e-5


def ds_json(tmp_path, stage: int, micro: int, accum: int = 1, fp32: bool = False, name: str = "") -> str:
    """A copy of ds_configs/zero<stage>.json with the batch layout (and precision) of a test."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    cfg["optimizer"]["params"]["lr"] = 3e-3  # the tiny test model learns visibly in a few steps
    if fp32:
        cfg.pop("bf16")
        # With clipping active ZeRO-1/2/3 compute the norm over partitions in another order
        # (about 4e-5 drift over 10 steps); parity is checked on the unclipped update.
        cfg.pop("gradient_clipping")
    path = tmp_path / f"ds_zero{stage}_{micro}x{accum}{'_fp32' if fp32 else ''}{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def pretrain_args(cfg: str, data, model, out, steps: int, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--data", str(data), "--model", str(model), "--output_dir", str(out),
            "--max_steps", str(steps), *extra]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="fp16 is not supported on CPU (DeepSpeed: 'Type fp16 is not supported on your device')")
def test_fp16_dynamic_loss_scaling_trains(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "run"
    cfg = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4)
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(cfg))
    ranks = min(2, torch.cuda.device_count())
    launch("recipes/pretrain.py", pretrain_args(str(path), tiny_data, tiny_model, out, 20, "--log_interval", "5"),
           ranks=ranks)
    train, evals = read_metrics(out)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize("stage", STAGES)
def test_data_parallel_parity_and_loss_falls(tmp_path, tiny_data, tiny_model, stage):
    """2 ranks x micro-batch 2 == 1 rank x 4 == 1 rank x 2 x 2 accumulation steps, in fp32; and it learns.

    The accumulating run takes the loss from the logits (--no-fused_loss), the others the fused
    loss (except at ZeRO-3, which always takes the plain one): both train alike."""
    steps = 12
    runs = {}
    for label, ranks, micro, accum in (("2x2", 2, 2, 1), ("1x4", 1, 4, 1), ("1x2x2", 1, 2, 2)):
        out = tmp_path / label
        args = pretrain_args(ds_json(tmp_path, stage, micro, accum, fp32=True), tiny_data, tiny_model, out, steps,
                             "--log_interval", "1", "--eval_interval", "6", *(["--no-fused_loss"] if accum > 1 else []))
        if ranks == 1:  # also covers a bare `python` run, without a launcher
            proc = run_python("recipes/pretrain.py", args)
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            launch("recipes/pretrain.py", args, ranks=ranks)
        train, evals = read_metrics(out)
        runs[label] = ([r["loss"] for r in train], [r["val_loss"] for r in evals],
                       consolidated_state_dict(out / "checkpoints"))

    # The 2-rank run on real text learns, and records what it did.
    out = tmp_path / "2x2"
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    print(f"ZeRO-{stage} 2x2: loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
          f"val_loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    assert train[-1]["loss"] < train[0]["loss"] - 0.3 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[0]["step"] == 0 and train[-1]["tokens"] == steps * 4 * 64
    assert all(r["tokens_per_sec"] > 0 and r["peak_mem_mb"] > 0 for r in train)
    # DeepSpeed computes the norm when it clips or partitions gradients; plain ZeRO-0 without clipping does not.
    assert all((r["grad_norm"] is None) if stage == 0 else (r["grad_norm"] > 0) for r in train)
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps}"
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["deepspeed"]["zero_optimization"]["stage"] == stage and resolved["world_size"] == 2
    assert resolved["deepspeed"]["scheduler"]["params"]["total_num_steps"] == steps
    assert resolved["fused_loss"] == (stage < 3)
    assert resolved["shm_comm"] is True  # so the parity below covers the shared-memory collectives
    assert json.loads((tmp_path / "1x2x2" / "config.json").read_text())["fused_loss"] is False

    ref_loss, ref_val, ref_weights = runs["1x4"]
    for label in ("2x2", "1x2x2"):
        loss, val, weights = runs[label]
        print(f"ZeRO-{stage} {label} vs 1x4: max |loss diff| {max(abs(a - b) for a, b in zip(loss, ref_loss)):.2e}")
        assert max(abs(a - b) for a, b in zip(loss, ref_loss)) < PARITY_TOL, (label, loss, ref_loss)
        assert max(abs(a - b) for a, b in zip(val, ref_val)) < PARITY_TOL, (label, val, ref_val)
        assert weights.keys() == ref_weights.keys()
        worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
        print(f"ZeRO-{stage} {label} vs 1x4: max |weight diff| {worst:.2e}")
        assert worst < PARITY_TOL, (label, worst)


BAD_INPUTS = {
    "missing data": (lambda d, m, t: {"--data": str(t / "nowhere")}, "data folder .* does not exist"),
    "malformed config": (lambda d, m, t: {"--deepspeed_config": _write(t / "bad.json", "{\"stage\": ,}")},
                         "is not valid JSON"),
    "fp16 on cpu": (lambda d, m, t: {"--deepspeed_config": str(REPO / "ds_configs" / "zero2_fp16.json")},
                    "fp16 is not supported on CPU"),
    "vocab too large": (lambda d, m, t: {"--model": _write(t / "m.json", json.dumps(
        {**json.loads(m.read_text()), "vocab_size": 100}))}, "exceeds the model's vocab_size"),
    "seq_len too long": (lambda d, m, t: {"--seq_len": "65"}, "exceeds the model's 64 positions"),
    "unknown model": (lambda d, m, t: {"--model": "gpt9"}, "neither a preset"),
}


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_nonzero(tmp_path, tiny_data, tiny_model, case):
    make, pattern = BAD_INPUTS[case]
    flags = {"--deepspeed_config": ds_json(tmp_path, 2, micro=2), "--data": str(tiny_data),
             "--model": str(tiny_model), "--output_dir": str(tmp_path / "out"), "--max_steps": "2",
             **make(tiny_data, tiny_model, tmp_path)}
    proc = run_python("recipes/pretrain.py", [x for kv in flags.items() for x in kv])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len([l for l in lines if l.startswith("error:")]) == 1, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_batch_that_does_not_fit_the_world_size(tmp_path, tiny_data, tiny_model):
    cfg = json.loads(open(ds_json(tmp_path, 2, micro=4)).read())
    cfg["train_batch_size"] = 4  # right for 1 rank, wrong for 2
    path = _write(tmp_path / "cfg.json", json.dumps(cfg))
    proc = launch("recipes/pretrain.py", pretrain_args(path, tiny_data, tiny_model, tmp_path / "out", 2), ranks=2,
                  check=False)
    assert proc.returncode != 0
    assert "error: DeepSpeed config: train_batch_size 4 != train_micro_batch_size_per_gpu 4" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = run_python("recipes/pretrain.py", pretrain_args(ds_json(tmp_path, 0, micro=2), tiny_data, tiny_model,
                                                           out, 2))
    assert proc.returncode == 2 and "is not empty; pass --resume" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
