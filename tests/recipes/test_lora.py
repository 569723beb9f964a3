"""LoRA fine-tuning on real ranks: the base's loss at step 0, data-parallel parity at ZeRO-2 and ZeRO-3,
a frozen base, adapters-only checkpoints, merged and adapter exports in plain transformers + peft,
exact resume, and the one-line errors."""

import json

import pytest
import torch

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from tests.helpers import TOLERANCE, ds_json, hf_only, launch, read_metrics, run_here

pytestmark = pytest.mark.slow

LORA = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]
STEPS = 6
# fp32 without clipping: one rank with a 4-sample micro-batch against two ranks of 2 differ only
# in summation order (measured: losses within 1e-6, adapter weights within 1e-6).
LOSS_TOL = 1e-5
WEIGHT_TOL = 5e-5


def finetune_args(cfg: str, base, demo, out, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--model_name_or_path", str(base), "--data", str(demo / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--log_interval", "1", "--eval_interval", "0",
            "--eval_batches", "4", "--truncate", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained, demo):
    """Full fine-tuning for the base's step-0 loss, and LoRA at 1 x 4 and 2 x 2, ZeRO-2 and ZeRO-3 (fp32).
    The 2-rank runs export merged and adapter folders; the ZeRO-3 one checkpoints at step 3 too."""
    tmp = tmp_path_factory.mktemp("lora")
    plans = {
        "full": (1, ds_json(tmp, 2, micro=4, fp32=True), ["--max_steps", "1"]),
        "zero2_1x4": (1, ds_json(tmp, 2, micro=4, fp32=True), LORA),
        "zero2_2x2": (2, ds_json(tmp, 2, micro=2, fp32=True), [*LORA, "--export_hf", str(tmp / "zero2_hf"),
                                                               "--export_adapter", str(tmp / "zero2_adapter")]),
        "zero3_1x4": (1, ds_json(tmp, 3, micro=4, fp32=True), LORA),
        "zero3_2x2": (2, ds_json(tmp, 3, micro=2, fp32=True), [*LORA, "--save_interval", "3", "--export_hf",
                                                               str(tmp / "zero3_hf"), "--export_adapter",
                                                               str(tmp / "zero3_adapter")]),
    }
    procs = {name: launch("recipes/finetune.py", finetune_args(cfg, pretrained, demo, tmp / name, *extra), ranks=ranks)
             for name, (ranks, cfg, extra) in plans.items()}
    return tmp, procs, {name: cfg for name, (_, cfg, _) in plans.items()}


def test_adapted_model_starts_at_the_base_loss_and_only_the_adapters_train(runs):
    tmp, procs, _ = runs
    base_loss = read_metrics(tmp / "full")[1][0]["val_loss"]
    for name in ("zero2_1x4", "zero2_2x2", "zero3_1x4", "zero3_2x2"):
        train, evals = read_metrics(tmp / name)
        assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - base_loss) < 1e-6, (name, evals[0], base_loss)
        assert evals[-1]["val_loss"] < base_loss - 0.005, (name, evals)  # the adapters learn (6 steps: ~0.014)
        config = json.loads((tmp / name / "config.json").read_text())
        adapter = config["adapter"]
        assert adapter["target_modules"] == ["c_attn", "c_fc", "c_proj"] and adapter["r"] == 8
        assert config["args"]["use_peft"] and config["args"]["lora_alpha"] == 16
        assert 0 < adapter["trainable_parameters"] < config["parameters"] / 2
        lines = [json.loads(l) for l in (tmp / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["base_unchanged"] for r in lines if "base_unchanged" in r] == [True], name
    assert "the base is frozen and stays partitioned" in procs["zero3_2x2"].stdout


def test_two_ranks_match_one_rank_at_zero2_and_zero3(runs):
    tmp, _, _ = runs
    reference = read_metrics(tmp / "zero2_1x4")[0]
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    ref_weights = consolidated_state_dict(tmp / "zero2_1x4" / "checkpoints")
    worst = {}
    for name in ("zero2_2x2", "zero3_1x4", "zero3_2x2"):
        train = read_metrics(tmp / name)[0]
        losses = max(abs(a["loss"] - b["loss"]) for a, b in zip(reference, train))
        assert [r["tokens"] for r in train] == [r["tokens"] for r in reference]
        weights = consolidated_state_dict(tmp / name / "checkpoints")
        assert weights.keys() == ref_weights.keys()
        diff = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
        worst[name] = (losses, diff)
        assert losses < LOSS_TOL and diff < WEIGHT_TOL, (name, losses, diff)
    print("LoRA parity against 1 rank x 4 at ZeRO-2 (max loss, max adapter weight difference):", worst)


def test_checkpoints_hold_the_adapters_and_not_the_base(runs, pretrained):
    tmp, _, _ = runs
    for name in ("zero2_2x2", "zero3_2x2"):
        step = tmp / name / "checkpoints" / f"step{STEPS}"
        weights = consolidated_state_dict(tmp / name / "checkpoints")
        assert weights and all("lora_" in k for k in weights), sorted(weights)[:5]
        states = torch.load(next(step.glob("*model_states.pt")), map_location="cpu", weights_only=False)
        assert all("lora_" in k for k in (states.get("module") or {})), name
        info = json.loads((step / "training.json").read_text())["adapter"]
        assert info["base_model"] == str(pretrained.resolve()) and info["base_fingerprint"].startswith("sha256:")
        assert (step / "adapter_config.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_merged_and_adapter_exports_reproduce_the_engine_in_plain_transformers_and_peft(runs, stage):
    tmp, _, _ = runs
    check = tmp / f"zero{stage}_2x2" / "export_check.pt"
    merged = hf_only(tmp / f"zero{stage}_hf", check)
    adapter = hf_only(tmp / f"zero{stage}_adapter", check, adapter=True)
    for result in (merged, adapter):
        assert result["max_logit_diff"] <= TOLERANCE["fp32"] and result["same_greedy_tokens"], result
        assert result["foreign_modules"] == [], result
    assert merged["class"] == "GPT2LMHeadModel" and adapter["class"] == "PeftModelForCausalLM"
    assert sorted(p.name for p in (tmp / f"zero{stage}_adapter").glob("adapter_*")) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_convert_tool_exports_a_zero3_lora_checkpoint_both_ways(runs, pretrained, tmp_path):
    tmp, _, _ = runs
    ckpt = tmp / "zero3_2x2"
    for flags, out in (([], tmp_path / "merged"), (["--adapter"], tmp_path / "adapter")):
        proc = run_here("tools/convert_to_hf.py", [str(ckpt), str(out), *flags])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = hf_only(out, ckpt / "export_check.pt", adapter=bool(flags))
        assert result["max_logit_diff"] <= TOLERANCE["fp32"] and result["same_greedy_tokens"], result
    # A base that moved is found with --base_model; one with other weights is refused.
    other = tmp / "zero2_hf"
    proc = run_here("tools/convert_to_hf.py", [str(ckpt), str(tmp_path / "x"), "--adapter", "--base_model",
                                                 str(other)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has other weights than the one checkpoint" in proc.stderr.strip().splitlines()[-1]


def test_lora_resumes_exactly_after_sigterm_and_refuses_another_base(runs, pretrained, demo, tmp_path):
    tmp, _, cfgs = runs
    out = tmp_path / "run"
    plain = finetune_args(cfgs["zero3_2x2"], pretrained, demo, out, "--save_interval", "3")
    args = [*plain, *LORA]
    proc = launch("recipes/finetune.py", args, check=False, fault="sigterm@2:1")
    assert proc.returncode == 143, proc.stderr[-3000:]
    other = run_here("recipes/finetune.py", [*args, "--resume", "--model_name_or_path", str(tmp / "zero2_hf")])
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "holds other weights" in other.stderr.strip().splitlines()[-1]
    full = run_here("recipes/finetune.py", [*plain, "--resume"])
    assert full.returncode == 2 and "resume it with --use_peft" in full.stderr.strip().splitlines()[-1]
    launch("recipes/finetune.py", [*args, "--resume"])
    reference, resumed = read_metrics(tmp / "zero3_2x2")[0], read_metrics(out)[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["tokens"] == b["tokens"], (a, b)


@pytest.mark.parametrize("flags, message", [
    (["--lora_target_modules", "q_proj"], "--lora_target_modules q_proj: "),
    (["--lora_target_modules", "ln_f"], "ln_f is a LayerNorm, which LoRA cannot adapt"),
])
def test_bad_lora_targets_stop_before_any_rank_starts(pretrained, demo, tmp_path, flags, message):
    args = finetune_args(ds_json(tmp_path, 2, micro=2), pretrained, demo, tmp_path / "out", "--use_peft", *flags)
    proc = run_here("recipes/finetune.py", args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_merged_and_adapter_exports_need_folders_of_their_own(pretrained, demo, tmp_path):
    same = str(tmp_path / "export")
    args = finetune_args(ds_json(tmp_path, 2, micro=2), pretrained, demo, tmp_path / "out", "--use_peft",
                         "--export_hf", same, "--export_adapter", same)
    proc = run_here("recipes/finetune.py", args)
    assert proc.returncode == 2 and "name the same folder" in proc.stderr.strip().splitlines()[-1]
