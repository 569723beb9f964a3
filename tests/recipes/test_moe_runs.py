"""Mixture-of-experts runs on real ranks (fp32, tiny Mixtral and Qwen3-MoE): DeepSpeed AutoEP's
expert parallelism over 2 ranks trains exactly as one rank does on the same micro-batches at
ZeRO-1, 2 and 3 (the router's load-balancing loss included), the logged expert load adds up,
a checkpoint resumes on one rank through DeepSpeed's universal format, and each export holds the
family's hub names and reloads in plain transformers to the one-rank run's logits."""

import json
import shutil

import pytest

from tests.helpers import (REPO, TINY_MIXTRAL, TINY_QWEN3_MOE, hf_only, launch, pretrain_args, read_metrics,
                           run_python)

pytestmark = pytest.mark.slow

STEPS = 6
PARITY_TOL = 2e-5
FAMILIES = {"mixtral": (TINY_MIXTRAL, "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
            "qwen3_moe": (TINY_QWEN3_MOE, "model.layers.0.mlp.experts.0.gate_proj.weight")}


def _ds(tmp, stage: int, micro: int, accum: int, experts: int | None) -> str:
    """The shipped expert-parallel JSON at a test's stage and batch layout, fp32 without clipping
    (summation order is the only difference between layouts); experts None: no AutoEP at all."""
    cfg = json.loads((REPO / "ds_configs" / "zero2_ep2.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    cfg["zero_optimization"] = {"stage": stage}
    cfg.pop("bf16", None)
    cfg.pop("gradient_clipping", None)
    if experts is None:
        cfg.pop("expert_parallel")
    else:
        cfg["expert_parallel"]["autoep_size"] = experts
    path = tmp / f"ds_{stage}_{micro}x{accum}_ep{experts}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _losses(out) -> dict[int, float]:
    train, _ = read_metrics(out)
    return {line["step"]: line["loss"] for line in train}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_data):
    """One family's runs: the reference (1 rank, 2 micro-batches of 2 accumulated, no AutoEP) and expert
    parallelism 2 on 2 ranks (micro-batch 2 each: the same micro-batches) at ZeRO-1, 2 and 3, exported."""
    name = request.param
    spec, hub_key = FAMILIES[name]
    tmp = tmp_path_factory.mktemp(f"moe_{name}")
    model = tmp / "model.json"
    model.write_text(json.dumps(spec))
    common = ("--seq_len", "64", "--log_interval", "1", "--eval_interval", "0", "--save_interval", "3")
    reference = tmp / "reference"
    proc = run_python("recipes/pretrain.py", pretrain_args(_ds(tmp, 1, 2, 2, None), tiny_data, model, reference, STEPS,
                                                           *common, "--export_hf", str(tmp / "reference_hf")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for stage in (1, 2, 3):
        out = tmp / f"ep2_zero{stage}"
        proc = launch("recipes/pretrain.py", pretrain_args(_ds(tmp, stage, 2, 1, 2), tiny_data, model, out, STEPS,
                                                           *common, "--export_hf", str(tmp / f"ep2_zero{stage}_hf")))
        runs[stage] = (out, proc.stdout + proc.stderr)
    return name, hub_key, tmp, model, reference, runs


STAGES = [1, 2, 3]


@pytest.mark.parametrize("stage", STAGES)
def test_expert_parallel_equals_one_rank_at_every_stage(family, stage):
    name, _, _, _, reference, runs = family
    expected = _losses(reference)
    assert len(expected) == STEPS and expected[STEPS] < expected[1]
    out, log = runs[stage]
    assert "Mixture of experts: 4 experts, top-2 per token" in log
    got = _losses(out)
    assert got.keys() == expected.keys()
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= PARITY_TOL, (name, stage, worst, got, expected)


def test_the_logged_expert_load_adds_up(family, tiny_data):
    _, _, _, _, reference, runs = family
    for out in [reference, *(out for out, _ in runs.values())]:
        train, evaluated = read_metrics(out)
        for line in train:
            assert line["aux_loss"] >= 1.0  # Switch's loss x experts: 1 for balanced top-1 routing, more for top-2
            assert set(line["expert_tokens"]) == {"layer0", "layer1"}
            for layer, counts in line["expert_tokens"].items():
                assert len(counts) == 4 and sum(counts) == 4 * 64 * 2, counts  # 4 windows of 64 tokens, top-2
                assert line["expert_imbalance"][layer] == pytest.approx(max(counts) / (sum(counts) / 4))
            assert line["expert_imbalance_max"] == max(line["expert_imbalance"].values())
        assert "val_aux_loss" in evaluated[-1] and "val_loss" in evaluated[-1]


def test_the_export_has_the_hub_names_and_the_engines_logits(family):
    """Each export holds the family's hub names and reloads in plain transformers to its own engine's logits."""
    from safetensors import safe_open

    name, hub_key, tmp, _, _, runs = family
    for stage, (out, _) in runs.items():
        folder = tmp / f"ep2_zero{stage}_hf"
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            names = set(weights.keys())
        assert hub_key in names and not any("gate_up_proj" in n or ".experts.w1" in n for n in names), sorted(names)[:8]
        own = hf_only(folder, out / "export_check.pt")
        assert own["max_logit_diff"] <= 1e-4 and own["foreign_modules"] == [], (name, stage, own)


@pytest.mark.parametrize("stage", STAGES)
def test_each_export_computes_what_the_one_rank_run_computes(family, stage):
    name, _, tmp, _, reference, runs = family
    one_rank = hf_only(tmp / f"ep2_zero{stage}_hf", reference / "export_check.pt")
    assert one_rank["max_logit_diff"] <= 1e-4, (name, stage, one_rank)


def test_resume_on_one_rank_through_the_universal_checkpoint(family, tiny_data):
    """The ZeRO-2 run's step-3 checkpoint (experts split over 2 ranks) resumes on 1 rank with AutoEP at
    size 1; its steps 4-6 are the unbroken run's."""
    name, _, tmp, model, _, runs = family
    unbroken, _ = runs[2]
    resumed = tmp / "resumed"
    shutil.copytree(unbroken, resumed, ignore=shutil.ignore_patterns("step6*"))
    proc = run_python("recipes/pretrain.py", pretrain_args(_ds(tmp, 2, 2, 2, 1), tiny_data, model, resumed, STEPS,
                                                           "--seq_len", "64", "--log_interval", "1", "--eval_interval",
                                                           "0", "--resume_from", "step3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experts over 2 -> 1 ranks at ZeRO-2" in proc.stdout
    expected, got = _losses(unbroken), _losses(resumed)
    for step in (4, 5, 6):
        assert abs(got[step] - expected[step]) <= 1e-5, (name, step, got, expected)


def test_fine_tuning_starts_from_an_moe_export(family, demo):
    """The one-rank run's export fine-tunes with expert parallelism at ZeRO-3 (the load-balancing loss
    on), and its export reloads to the engine's logits."""
    name, hub_key, tmp, _, _, _ = family
    if name != "mixtral":
        pytest.skip("one family shows it; the parity tests cover both")
    out = tmp / "finetuned"
    launch("recipes/finetune.py", ["--deepspeed_config", _ds(tmp, 3, 2, 1, 2), "--model_name_or_path",
                                   str(tmp / "reference_hf"), "--data", str(demo / "train.jsonl"), "--output_dir",
                                   str(out), "--max_steps", "4", "--log_interval", "1", "--eval_batches", "2",
                                   "--seq_len", "64", "--truncate", "--export_hf", str(tmp / "finetuned_hf")])
    train, evaluated = read_metrics(out)
    assert len(train) == 4 and all("aux_loss" in line for line in train)
    assert evaluated[-1]["val_loss"] < evaluated[0]["val_loss"]
    assert hf_only(tmp / "finetuned_hf", out / "export_check.pt")["max_logit_diff"] <= 1e-4
