"""DPO on real ranks: the reference pass equals the policy at step 0, 2 x 2 = 1 x 4 at ZeRO-2 and ZeRO-3,
LoRA, exact resume reusing the stored reference, and stored references of other data refused."""

import json
import math

import pytest

from tests.helpers import demo_pairs, ds_json, launch, read_metrics, run_here, run_python

pytestmark = pytest.mark.slow

STEPS = 4
# fp32 without clipping, as for fine-tuning: summation order only (measured: within 1e-6).
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, demo):
    """64 training and 32 held-out pairs of the demo preference set."""
    return demo_pairs(demo, tmp_path_factory.mktemp("pairs"), 64, 32)


def dpo_args(cfg: str, base, pairs, out, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--model_name_or_path", str(base), "--data", str(pairs / "train.jsonl"),
            "--val_data", str(pairs / "val.jsonl"), "--output_dir", str(out), "--max_steps", str(STEPS),
            "--log_interval", "1", "--eval_interval", "0", "--eval_batches", "2", "--truncate", "--beta", "0.5",
            *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained, pairs):
    tmp = tmp_path_factory.mktemp("dpo")
    plans = {
        "zero2_1x4": (1, ds_json(tmp, 2, micro=4, fp32=True), []),
        "zero2_2x2": (2, ds_json(tmp, 2, micro=2, fp32=True), []),
        "zero3_2x2": (2, ds_json(tmp, 3, micro=2, fp32=True), ["--save_interval", "2", "--export_hf",
                                                               str(tmp / "zero3_hf")]),
        "lora_zero3": (2, ds_json(tmp, 3, micro=2, fp32=True), ["--use_peft", "--lora_r", "8", "--lora_dropout", "0"]),
    }
    procs = {name: launch("recipes/dpo.py", dpo_args(cfg, pretrained, pairs, tmp / name, *extra), ranks=ranks)
             for name, (ranks, cfg, extra) in plans.items()}
    return tmp, procs, {name: cfg for name, (_, cfg, _) in plans.items()}


def test_reference_equals_the_policy_at_step_0(runs):
    tmp, procs, _ = runs
    for name in ("zero2_1x4", "zero2_2x2", "zero3_2x2", "lora_zero3"):
        train, evals = read_metrics(tmp / name)
        first = evals[0]
        assert first["step"] == 0 and abs(first["val_loss"] - math.log(2)) < 1e-6, (name, first)
        assert abs(first["val_reward_margin"]) < 1e-6 and first["val_reward_accuracy"] == 0.0, (name, first)
        assert abs(train[0]["loss"] - math.log(2)) < 1e-5, (name, train[0])  # step 1 scores the starting model
        for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            assert key in train[-1] and f"val_{key}" in evals[-1], key
        assert "val_ppl" not in first
        assert (tmp / name / "reference_logps.pt").is_file()
    assert "Reference log-probabilities: one pass of the starting model" in procs["zero3_2x2"].stdout
    assert "the adapters start at zero" in procs["lora_zero3"].stdout
    assert "the base is frozen and stays partitioned" in procs["lora_zero3"].stdout


def test_two_ranks_match_one_rank_at_zero2_and_zero3(runs):
    tmp, _, _ = runs
    reference = read_metrics(tmp / "zero2_1x4")[0]
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["reward_chosen"] != 0.0, reference  # the policy has moved away from the reference
    worst = {}
    for name in ("zero2_2x2", "zero3_2x2"):
        train = read_metrics(tmp / name)[0]
        worst[name] = max(max(abs(a[k] - b[k]) for k in ("loss", "reward_margin")) for a, b in zip(reference, train))
        assert worst[name] < LOSS_TOL, (name, worst[name])
    print("DPO parity against 1 rank x 4 at ZeRO-2 (max loss / margin difference):", worst)
    record = [json.loads(line) for line in (tmp / "zero3_2x2" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["export_same_greedy_tokens"] and record["export_logit_diff_vs_engine"] <= 1e-4


def test_resume_after_sigterm_reuses_the_stored_reference(runs, pretrained, pairs, tmp_path):
    tmp, _, cfgs = runs
    out = tmp_path / "run"
    args = dpo_args(cfgs["zero3_2x2"], pretrained, pairs, out, "--save_interval", "2")
    proc = launch("recipes/dpo.py", args, check=False, fault="sigterm@1:1")
    assert proc.returncode == 143, proc.stderr[-3000:]
    stored = (out / "reference_logps.pt").stat().st_mtime_ns

    # Other held-out pairs: the stored reference no longer belongs to the run.
    other = pairs / "other_val.jsonl"
    other.write_text("\n".join((pairs / "val.jsonl").read_text().splitlines()[1:]) + "\n")
    proc = run_here("recipes/dpo.py", [*args[:args.index("--val_data") + 1], str(other),
                                         *args[args.index("--val_data") + 2:], "--resume"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "reference log-probabilities of other data" in proc.stderr.strip().splitlines()[-1]

    resumed = launch("recipes/dpo.py", [*args, "--resume"])
    assert "Reference log-probabilities: reusing" in resumed.stdout
    assert (out / "reference_logps.pt").stat().st_mtime_ns == stored
    full, part = read_metrics(tmp / "zero3_2x2")[0], read_metrics(out)[0]
    assert [r["step"] for r in part] == list(range(1, STEPS + 1))
    for a, b in zip(full, part):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["reward_margin"] - b["reward_margin"]) < 1e-6, (a, b)

    (out / "reference_logps.pt").unlink()
    proc = run_here("recipes/dpo.py", [*args, "--resume", "--max_steps", str(STEPS + 2)])
    assert proc.returncode == 2 and "reference_logps.pt is missing" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "row 2: a preference pair needs 'prompt' (or 'messages'), 'chosen' and "
                                     "'rejected' (missing rejected)"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "row 2: 'chosen' and 'rejected' are the same answer"),
])
def test_bad_pairs_stop_with_file_and_row(pretrained, pairs, tmp_path, row, message):
    data = tmp_path / "bad.jsonl"
    good = json.loads((pairs / "train.jsonl").read_text().splitlines()[0])
    data.write_text("\n".join(json.dumps(r) for r in (good, row, good)) + "\n")
    args = dpo_args(ds_json(tmp_path, 2, micro=2), pretrained, pairs, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    proc = run_here("recipes/dpo.py", args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {data} {message}")


def test_a_pair_longer_than_the_limit_is_dropped_or_refused(pretrained, pairs, tmp_path):
    args = dpo_args(ds_json(tmp_path, 2, micro=2), pretrained, pairs, tmp_path / "out", "--seq_len", "8",
                    "--max_steps", "1")
    args.remove("--truncate")
    proc = run_here("recipes/dpo.py", args)
    assert proc.returncode == 2
    assert "every pair has a side longer than 9 tokens; raise --seq_len or pass --truncate" in proc.stderr
    proc = run_here("recipes/dpo.py", [*args, "--beta", "0"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == "error: --beta must be positive, got 0.0"


def test_the_rpo_term_keeps_the_held_out_answers_likelihood(pretrained, pairs, tmp_path):
    """The demo's guard against DPO's known failure: with --rpo_alpha 1 the held-out chosen answers'
    loss (nats per token) does not end above where it started, and ends below a run without it."""
    ends = {}
    for name, extra in (("dpo", []), ("rpo", ["--rpo_alpha", "1"])):
        args = dpo_args(ds_json(tmp_path, 2, micro=4, fp32=True), pretrained, pairs, tmp_path / name,
                        "--max_steps", "16", "--log_interval", "16", "--ds", "optimizer.params.lr=1e-4", *extra)
        args[args.index("--beta") + 1] = "0.1"  # the demo's beta; a learning rate that shows the failure in 16 steps
        proc = run_python("recipes/dpo.py", args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals = read_metrics(tmp_path / name)[1]
        start, ends[name] = evals[0]["val_nll_chosen"], evals[-1]["val_nll_chosen"]
        assert evals[-1]["val_reward_margin"] > 0, (name, evals[-1])  # the preference moves the right way either way
    assert ends["rpo"] <= start, (start, ends)
    assert ends["rpo"] < ends["dpo"], ends
