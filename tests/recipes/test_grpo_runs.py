"""GRPO end to end on 2 ranks at ZeRO-3: the held-out reward rises, a SIGTERM'd run resumes exactly, LoRA
exports merged and adapter folders, a KL term uses the base (LoRA) or a frozen copy (without), and bad
input stops before any rank starts."""

import json

import pytest

from tests.helpers import TOLERANCE, ds_json, hf_only, launch, read_metrics, run_here

pytestmark = pytest.mark.slow

# A reward the tiny pretrained model (trained on Python source) can raise in a few steps: the
# share of spaces in the completion, which indentation-heavy code makes easy to move.
REWARD = "def spaces(prompts, completions, **columns):\n    return [c.count(' ') / max(1, len(c)) for c in completions]\n"
STEPS = 16
SEED = 1234


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts")
    topics = ["a file", "a list", "a socket", "a thread", "a string", "a number", "a date", "a path", "a queue",
              "a lock", "a module", "a class", "a test", "a parser", "a buffer", "a table"]
    rows = [{"prompt": f"Write code that handles {t} ({k})."} for k in range(3) for t in topics]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    (out / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]))
    (out / "rewards.py").write_text(REWARD)
    return out


def grpo_args(tmp, base, prompts, out, *extra):
    return ["--deepspeed_config", ds_json(tmp, 3, micro=4, fp32=True), "--model_name_or_path", str(base),
            "--data", str(prompts / "train.jsonl"), "--val_data", str(prompts / "val.jsonl"), "--output_dir", str(out),
            "--reward_funcs", f"{prompts / 'rewards.py'}:spaces", "--num_generations", "4",
            "--max_completion_length", "8", "--max_steps", str(STEPS), "--log_interval", "1", "--eval_interval",
            str(STEPS), "--eval_batches", "4", "--save_interval", "8", "--seed", str(SEED), "--beta", "0.05", *extra]


def test_the_held_out_reward_rises_and_a_stopped_run_resumes_exactly(tmp_path, pretrained, prompts):
    """Full fine-tuning with a KL term: the starting model is a frozen copy, partitioned like the policy."""
    full = tmp_path / "full"
    proc = launch("recipes/grpo.py", grpo_args(tmp_path, pretrained, prompts, full))
    assert "generation" in proc.stdout and "2 prompts x 4 completions per step" in proc.stdout, proc.stdout
    assert "KL to a frozen copy of the starting model, partitioned" in proc.stdout, proc.stdout
    train, evals = read_metrics(full)
    assert [e["step"] for e in evals] == [0, STEPS]
    start, end = evals[0]["val_reward"], evals[-1]["val_reward"]
    # Measured with seed 1234: 0.000 at step 0 (the greedy completions hold no space), 0.875 at step 16.
    assert end > start + 0.5, (start, end)
    assert all(0 <= r["completion_clipped"] <= 1 and r["generation_ms"] > 0 for r in train)
    assert train[0]["kl"] <= 1e-6 and train[-1]["kl"] > 1e-6, (train[0], train[-1])  # 0 until the policy moves
    assert all(key in train[0] for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length",
                                           "clip_ratio", "entropy", "rewards/spaces"))
    # Stopped by SIGTERM after step 10, resumed: steps 11..16 sample and train as the uninterrupted run did.
    part = tmp_path / "part"
    proc = launch("recipes/grpo.py", grpo_args(tmp_path, pretrained, prompts, part), check=False, fault="sigterm@10:1")
    assert proc.returncode == 143, proc.stderr[-2000:]
    launch("recipes/grpo.py", grpo_args(tmp_path, pretrained, prompts, part, "--resume"))
    resumed = read_metrics(part)[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(train[10:], resumed[10:]):
        assert (a["reward"], a["completion_length"]) == (b["reward"], b["completion_length"]), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)


def test_lora_grpo_exports_merged_and_adapter_folders(tmp_path, pretrained, prompts):
    out = tmp_path / "lora"
    launch("recipes/grpo.py", grpo_args(tmp_path, pretrained, prompts, out, "--use_peft", "--lora_dropout", "0",
                                        "--max_steps", "4", "--export_hf", str(tmp_path / "merged"),
                                        "--export_adapter", str(tmp_path / "adapter")))
    train, _ = read_metrics(out)
    assert all(r["kl"] >= 0 for r in train)  # the KL to the base with the adapters disabled
    check = out / "export_check.pt"
    for folder, adapter in ((tmp_path / "merged", False), (tmp_path / "adapter", True)):
        result = hf_only(folder, check, adapter=adapter)
        assert result["max_logit_diff"] <= TOLERANCE["fp32"] and result["same_greedy_tokens"], result


@pytest.mark.parametrize("extra, message", [
    (["--reward_funcs", "{prompts}/rewards.py:nothing"], "has no function 'nothing'"),
    (["--use_peft", "--torch_compile"], "--torch_compile is not supported with GRPO: each step's completions have new "
                                        "lengths"),
])
def test_bad_input_stops_in_one_line_before_any_rank_starts(tmp_path, pretrained, prompts, extra, message):
    """Cases through the recipe (the others are unit tests in tests/train/test_grpo.py); compiling GRPO
    at ZeRO-3 with LoRA ran for minutes a step, so it is refused."""
    args = grpo_args(tmp_path, pretrained, prompts, tmp_path / "bad") + [a.format(prompts=prompts) for a in extra]
    proc = run_here("recipes/grpo.py", args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
    assert not (tmp_path / "bad").exists()  # nothing was written


@pytest.mark.parametrize("scoring", ["held-out", "training"])
def test_a_reward_that_fails_on_one_rank_is_named_with_its_message(tmp_path, pretrained, prompts, scoring):
    """Only rank 1's completions make the reward raise, while evaluating (no grad) or training: every
    rank stops with the reward's own message."""
    rewards = tmp_path / "flaky.py"
    rewards.write_text(f"import os, torch\ndef flaky(prompts, completions, **kw):\n"
                       f"    if os.environ['RANK'] == '1' and torch.is_grad_enabled() is {scoring == 'training'}:\n"
                       "        raise ValueError('cannot score this one')\n"
                       "    return [0.0] * len(completions)\n")
    args = grpo_args(tmp_path, pretrained, prompts, tmp_path / "run", "--max_steps", "2") + [
        "--reward_funcs", f"{rewards}:flaky"]
    proc = launch("recipes/grpo.py", args, check=False, launcher="deepspeed")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: reward function flaky failed: ValueError: cannot score this one (on rank 1)" in proc.stderr, \
        proc.stderr[-3000:]
    assert "killed, out of memory" not in proc.stderr and "Traceback" not in proc.stderr
