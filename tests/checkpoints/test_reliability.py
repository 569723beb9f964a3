"""Interrupted runs: preemption, a kill in the middle of a save, a NaN; each then resumed or stopped cleanly."""

import json
import os
import re
import shutil

import pytest

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from gpt_recipes.checkpoints.paths import complete_tags, is_complete
from tests.helpers import ds_json, launch, pretrain_args, read_metrics, run_here

pytestmark = pytest.mark.slow

STEPS = 12
# fp32, same world size and stage: losses after the resume match to 1e-6; final weights to 1e-5
# (ZeRO-3 came back 1.2e-6 apart here; ZeRO-2 bit-identical).
LOSS_TOL, WEIGHT_TOL = 1e-6, 1e-5


def _run(tmp, stage, data, model, out, fault=None, check=True, extra=(), ranks=2):
    # The global batch stays 4 (2 per rank x 2 ranks, or 2 x 2 accumulation steps on one rank).
    cfg = ds_json(tmp, stage, micro=2, accum=2 // ranks, fp32=True)
    args = pretrain_args(cfg, data, model, out, STEPS, "--log_interval", "1", "--save_interval", "3",
                         "--eval_interval", "0", *extra)
    if fault:
        os.environ["GPT_RECIPES_FAULT"] = fault
    try:
        # a run that ends badly starts as users start runs: what these tests inspect is what the
        # deepspeed launcher passes on
        return launch("recipes/pretrain.py", args, check=check, ranks=ranks, launcher=None if check else "deepspeed")
    finally:
        os.environ.pop("GPT_RECIPES_FAULT", None)


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_data, tiny_model):
    """Uninterrupted 2-rank fp32 runs of STEPS steps, checkpointing every 3, one per ZeRO stage asked for."""
    runs = {}

    def get(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"reference{stage}")
            _run(tmp, stage, tiny_data, tiny_model, tmp / "run")
            runs[stage] = tmp / "run"
        return runs[stage]

    return get


def _stopped_at(reference_out, tmp, step):
    """A copy of a reference run as it stood after its step-`step` checkpoint."""
    out = tmp / "resumed"
    shutil.copytree(reference_out, out)
    for tag in (out / "checkpoints").iterdir():
        if tag.is_dir() and int(tag.name.removeprefix("step")) > step:
            shutil.rmtree(tag)
    (out / "checkpoints" / "latest").write_text(f"step{step}")
    return out


def _same_as_reference(out, reference_out, from_step, loss_tol=LOSS_TOL, weight_tol=WEIGHT_TOL):
    ref, got = read_metrics(reference_out)[0], read_metrics(out)[0]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one line per step, none twice
    for a, b in zip(ref[from_step:], got[from_step:]):
        assert abs(a["loss"] - b["loss"]) < loss_tol and a["lr"] == b["lr"] and a["tokens"] == b["tokens"], (a, b)
    wa, wb = consolidated_state_dict(reference_out / "checkpoints"), consolidated_state_dict(out / "checkpoints")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < weight_tol


def test_sigterm_on_one_rank_saves_then_resumes_exactly(tmp_path, references, tiny_data, tiny_model):
    """At ZeRO-3 (partitioned parameters: the hardest to resume); a SIGTERM'd ZeRO-2 run resumes exactly
    in the compiled and sequence-parallel tests, a ZeRO-1 one in the tensor-parallel test."""
    stage = 3
    reference_out = references(stage)
    out = tmp_path / "run"
    proc = _run(tmp_path, stage, tiny_data, tiny_model, out, fault="sigterm@5:1", check=False)
    assert proc.returncode == 143, proc.stderr[-3000:]  # 128 + SIGTERM, for schedulers to requeue
    # Received after step 5; the ranks' agreement on it is read one step later (it runs asynchronously).
    assert "stopped: SIGTERM received: saved a checkpoint at step 6" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    _run(tmp_path, stage, tiny_data, tiny_model, out, extra=["--resume"])
    _same_as_reference(out, reference_out, from_step=6)


def test_kill_during_save_never_leaves_latest_on_a_partial_checkpoint(tmp_path, references, tiny_data, tiny_model):
    stage, reference_out = 2, references(2)
    out = tmp_path / "run"
    proc = _run(tmp_path, stage, tiny_data, tiny_model, out, fault="kill_in_save@6", check=False)
    assert proc.returncode != 0
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3" and is_complete(ckpt / "step3")
    assert (ckpt / "step6").is_dir() and not is_complete(ckpt / "step6")  # shards written, never completed
    _run(tmp_path, stage, tiny_data, tiny_model, out, extra=["--resume", "--keep_last", "2"])
    _same_as_reference(out, reference_out, from_step=3)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step12", "step9"]  # rotated


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "run"
    proc = _run(tmp_path, 2, tiny_data, tiny_model, out, fault="nan@5", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert ("error: the training loss became NaN or infinite between steps 4 and 5; the last good checkpoint, "
            "step3, is kept") in proc.stderr
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3" and not (ckpt / "step6").exists()
    assert json.loads((ckpt / "step3" / "training.json").read_text())["step"] == 3


# Resuming on another layout changes the reduction order (one rank accumulating two
# micro-batches instead of two ranks averaging): still rounding level in fp32.
ELASTIC_TOL = 1e-5


def test_elastic_resume_two_ranks_to_one_keeps_optimizer_state(tmp_path, references, tiny_data, tiny_model):
    out = _stopped_at(references(2), tmp_path, 6)
    proc = _run(tmp_path, 2, tiny_data, tiny_model, out, extra=["--resume"], ranks=1)
    assert "Resuming across a layout change (2 ranks at ZeRO-2 -> 1 ranks at ZeRO-2)" in proc.stdout
    # Adam's moments came along: a fresh optimizer would give visibly different losses.
    _same_as_reference(out, references(2), from_step=6, loss_tol=ELASTIC_TOL, weight_tol=ELASTIC_TOL)


def test_elastic_resume_zero3_two_ranks_to_one(tmp_path, references, tiny_data, tiny_model):
    out = _stopped_at(references(3), tmp_path, 6)
    proc = _run(tmp_path, 3, tiny_data, tiny_model, out, extra=["--resume"], ranks=1)
    assert "(2 ranks at ZeRO-3 -> 1 ranks at ZeRO-3)" in proc.stdout
    _same_as_reference(out, references(3), from_step=6, loss_tol=ELASTIC_TOL, weight_tol=ELASTIC_TOL)


def test_elastic_resume_zero3_to_zero2(tmp_path, references, tiny_data, tiny_model):
    out = _stopped_at(references(3), tmp_path, 6)
    proc = _run(tmp_path, 2, tiny_data, tiny_model, out, extra=["--resume"])
    assert "(2 ranks at ZeRO-3 -> 2 ranks at ZeRO-2)" in proc.stdout
    _same_as_reference(out, references(3), from_step=6, loss_tol=ELASTIC_TOL, weight_tol=ELASTIC_TOL)


def test_resume_with_another_global_batch_is_refused(tmp_path, references, tiny_data, tiny_model):
    out = _stopped_at(references(2), tmp_path, 6)
    args = pretrain_args(ds_json(tmp_path, 2, micro=2, fp32=True), tiny_data, tiny_model, out, STEPS, "--resume")
    proc = run_here("recipes/pretrain.py", args)  # refused before any rank starts
    assert proc.returncode == 2
    assert re.search(r"error: --resume: checkpoint .*step\d+ was trained with global batch 4 and seq_len 64; "
                     r"this run has 2 and 64", proc.stderr), proc.stderr[-2000:]


def test_resume_without_latest_takes_the_newest_complete_checkpoint_and_deletes_none(tmp_path, references,
                                                                                    tiny_data, tiny_model):
    """A user rolled back by deleting the newest steps and `latest`; an interrupted save left step9 incomplete."""
    reference_out = references(2)
    out = _stopped_at(reference_out, tmp_path, 6)
    ckpt = out / "checkpoints"
    (ckpt / "latest").unlink()
    shutil.copytree(reference_out / "checkpoints" / "step9", ckpt / "step9")
    (ckpt / "step9" / "training.json").unlink()
    proc = _run(tmp_path, 2, tiny_data, tiny_model, out, extra=["--resume"])
    assert "there is no 'latest' file: resuming from the newest complete checkpoint, step6" in proc.stdout
    _same_as_reference(out, reference_out, from_step=6)
    assert complete_tags(ckpt) == ["step3", "step6", "step9", "step12"]  # step3 and step6 survived the saves


def test_extending_a_run_keeps_its_schedule(tmp_path, references, tiny_data, tiny_model):
    """Resumed with a larger --max_steps, the run keeps the schedule it was planned with (and says so):
    the learning rate does not jump back up, and past its end it stays at the final rate."""
    reference_out = references(2)
    out = _stopped_at(reference_out, tmp_path, STEPS)
    args = pretrain_args(ds_json(tmp_path, 2, micro=2, fp32=True), tiny_data, tiny_model, out, STEPS + 3,
                         "--log_interval", "1", "--save_interval", "3", "--eval_interval", "0", "--resume")
    proc = launch("recipes/pretrain.py", args)
    assert (f"Resuming keeps the schedule the run was planned with: scheduler.params.total_num_steps = {STEPS} "
            f"(--max_steps {STEPS + 3} would make it {STEPS + 3})") in proc.stdout
    ref, got = read_metrics(reference_out)[0], read_metrics(out)[0]
    assert [r["lr"] for r in got[:STEPS]] == [r["lr"] for r in ref] and len(got) == STEPS + 3
    final = ref[-1]["lr"]
    assert final == pytest.approx(0.1 * 3e-3)  # cos_min_ratio 0.1 of the test's peak rate
    assert [r["lr"] for r in got[STEPS:]] == pytest.approx([final] * 3)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["deepspeed"]["scheduler"]["params"]["total_num_steps"] == STEPS


def test_a_damaged_checkpoint_is_named_before_anything_loads_it(tmp_path, references, tiny_data, tiny_model):
    """A shard cut short in a complete checkpoint: --resume and the export tool each stop with one
    line naming the file and the newest intact checkpoint, which then exports."""
    out = _stopped_at(references(2), tmp_path, 9)
    shard = next((out / "checkpoints" / "step9").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    args = pretrain_args(ds_json(tmp_path, 2, micro=2, fp32=True), tiny_data, tiny_model, out, STEPS, "--resume")
    proc = run_here("recipes/pretrain.py", args)  # refused before any rank starts
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"error: checkpoint .*step9 is damaged: {shard.name} is \d+ bytes, \d+ when it was saved "
                     r"\(truncated or overwritten\); the newest intact checkpoint is step6: point .*latest at it "
                     r"\(echo step6 > .*latest\), then continue with: \S+ \S*recipes/pretrain.py .* --resume$",
                     proc.stderr.strip()), proc.stderr[-2000:]
    proc = run_here("tools/convert_to_hf.py", [str(out), str(tmp_path / "hf")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "is damaged" in proc.stderr and "export it with --tag step6" in proc.stderr
    assert run_here("tools/convert_to_hf.py", [str(out), str(tmp_path / "hf"), "--tag", "step6"]).returncode == 0
    # A checkpoint saved before sizes were recorded: the reader's failure is still one line.
    info = json.loads((out / "checkpoints" / "step9" / "training.json").read_text())
    info.pop("files")
    (out / "checkpoints" / "step9" / "training.json").write_text(json.dumps(info))
    proc = run_here("tools/convert_to_hf.py", [str(out), str(tmp_path / "hf2")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not be read, a file of it is damaged or missing" in proc.stderr


def test_a_disk_that_fills_while_saving_is_named_and_the_last_checkpoint_kept(tmp_path, tiny_data, tiny_model):
    out = tmp_path / "run"
    proc = _run(tmp_path, 2, tiny_data, tiny_model, out, fault="disk_full@6", check=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert re.search(r"error: writing checkpoint .*step6 failed on rank 0: \[Errno 28\] No space left on device "
                     r"\(is the disk full\?\); the previous checkpoint, step3, is intact: free some space and continue "
                     r"with: .*deepspeed\S* .*recipes/pretrain.py .* --resume", log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "killed, out of memory" not in log, log[-3000:]  # rank 0 said why; rank 1 does not guess
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step3" and is_complete(ckpt / "step3") and not is_complete(ckpt / "step6")
