"""Sequence parallelism (DeepSpeed Ulysses) and tensor parallelism (DeepSpeed AutoTP) on 2 CPU ranks:
each trains like one rank on the same samples, resumes exactly, and exports what the engine computes."""

import json
from pathlib import Path

import pytest

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from tests.helpers import TOLERANCE, ds_json, hf_only, launch, pretrain_args, read_metrics, run_python

pytestmark = pytest.mark.slow

STEPS = 8
# Both layouts compute the same sums in another order (attention over gathered heads, the
# loss split over ranks, all-reduced partial products in split layers): fp32 rounding level.
LOSS_TOL = 2e-5
WEIGHT_TOL = 5e-5
# A Llama-family shape AutoTP splits in two: heads, key-value heads and MLP width divide by 2.
TP_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 176, "max_position_embeddings": 64,
            "tie_word_embeddings": True}


def _config(tmp_path, stage: int, micro: int, name: str, **extra) -> str:
    """An fp32 DeepSpeed JSON without clipping (bit-level same-layout resume), plus `extra` keys."""
    path = ds_json(tmp_path, stage, micro, fp32=True, name=name)
    cfg = json.loads(open(path).read())
    cfg.update(extra)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _run(script: str, args: list[str], ranks: int):
    if ranks == 1:
        proc = run_python(script, args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return launch(script, args, ranks=ranks)


def _compare(reference, other):
    """Per-step losses and gradient norms, and the final weights, of two runs on the same samples."""
    ref_train, ref_eval = read_metrics(reference)
    train, evals = read_metrics(other)
    assert [r["step"] for r in train] == [r["step"] for r in ref_train] == list(range(1, STEPS + 1))
    for a, b in zip(ref_train, train):
        assert abs(a["loss"] - b["loss"]) < LOSS_TOL, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < LOSS_TOL * max(1.0, a["grad_norm"]), (a, b)
        assert a["tokens"] == b["tokens"]
    for a, b in zip(ref_eval, evals):
        assert abs(a["val_loss"] - b["val_loss"]) < LOSS_TOL, (a, b)
    ref_w, w = consolidated_state_dict(reference / "checkpoints"), consolidated_state_dict(other / "checkpoints")
    assert ref_w.keys() == w.keys()
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in ref_w)
    assert worst < WEIGHT_TOL, worst
    assert ref_train[-1]["loss"] < ref_train[0]["loss"]  # it trained


def _resumed_matches(full, args: list[str], script: str):
    """A run stopped by SIGTERM after step STEPS/2 and resumed continues exactly as the run that never stopped."""
    stopped = launch(script, args, check=False, fault=f"sigterm@{STEPS // 2}:1")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    launch(script, args + ["--resume"])
    resumed = read_metrics(Path(args[args.index("--output_dir") + 1]))[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(read_metrics(full)[0][STEPS // 2:], resumed[STEPS // 2:]):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"], (a, b)


def test_sequence_parallel_pretraining_matches_one_rank_and_resumes(tmp_path, tiny_data, tiny_model):
    common = ("--log_interval", "1", "--eval_interval", "4", "--save_interval", "4")
    reference, sp = tmp_path / "one_rank", tmp_path / "sp2"
    _run("recipes/pretrain.py", pretrain_args(_config(tmp_path, 2, 4, "ref"), tiny_data, tiny_model, reference,
                                              STEPS, *common), ranks=1)
    sp_cfg = _config(tmp_path, 2, 4, "sp", sequence_parallel_size=2)
    proc = _run("recipes/pretrain.py", pretrain_args(sp_cfg, tiny_data, tiny_model, sp, STEPS, *common), ranks=2)
    assert "Sequence parallel: 2 ranks" in proc.stdout
    _compare(reference, sp)
    _resumed_matches(sp, pretrain_args(sp_cfg, tiny_data, tiny_model, tmp_path / "sp2_resumed", STEPS, *common),
                     "recipes/pretrain.py")


def test_sequence_parallel_llama_at_zero3_matches_one_rank(tmp_path, tiny_data):
    """Llama (rotary positions, grouped key-value heads) with the model built partitioned."""
    model = tmp_path / "llama.json"
    model.write_text(json.dumps(TP_LLAMA))
    common = ("--log_interval", "1", "--eval_interval", "4", "--seq_len", "64")
    _run("recipes/pretrain.py", pretrain_args(_config(tmp_path, 3, 4, "ref"), tiny_data, model, tmp_path / "one_rank",
                                              STEPS, *common), ranks=1)
    _run("recipes/pretrain.py", pretrain_args(_config(tmp_path, 3, 4, "sp", sequence_parallel_size=2), tiny_data,
                                              model, tmp_path / "sp2", STEPS, *common), ranks=2)
    _compare(tmp_path / "one_rank", tmp_path / "sp2")


def test_sequence_parallel_finetuning_matches_one_rank(tmp_path, pretrained, demo):
    """Packed examples (positions restart in each, nothing attends across them), each sample's tokens
    split over the 2 ranks; padded batches take the same path with one example per row."""
    pack = True

    def args(cfg, out):
        return ["--deepspeed_config", cfg, "--model_name_or_path", str(pretrained), "--data",
                str(demo / "train.jsonl"), "--output_dir", str(out), "--max_steps", str(STEPS),
                *(["--pack"] if pack else []),
                "--truncate", "--log_interval", "1", "--eval_interval", "4", "--eval_batches", "2"]

    _run("recipes/finetune.py", args(_config(tmp_path, 3, 2, "ref"), tmp_path / "one_rank"), ranks=1)
    _run("recipes/finetune.py", args(_config(tmp_path, 3, 2, "sp", sequence_parallel_size=2), tmp_path / "sp2"),
         ranks=2)
    _compare(tmp_path / "one_rank", tmp_path / "sp2")


def test_tensor_parallel_matches_one_rank_exports_and_resumes(tmp_path, tiny_data):
    model = tmp_path / "llama.json"
    model.write_text(json.dumps(TP_LLAMA))
    common = ("--log_interval", "1", "--eval_interval", "4", "--save_interval", "4")
    reference, tp, hf = tmp_path / "one_rank", tmp_path / "tp2", tmp_path / "tp2_hf"
    _run("recipes/pretrain.py", pretrain_args(_config(tmp_path, 1, 4, "ref"), tiny_data, model, reference, STEPS,
                                              *common), ranks=1)
    tp_cfg = _config(tmp_path, 1, 4, "tp", tensor_parallel={"autotp_size": 2, "vocab_parallel_lm_head": False})
    proc = _run("recipes/pretrain.py", pretrain_args(tp_cfg, tiny_data, model, tp, STEPS, *common,
                                                     "--export_hf", str(hf)), ranks=2)
    assert "Tensor parallel: 2 ranks" in proc.stdout
    # Each rank's checkpoint file holds its half of every split weight, merged on export.
    assert sorted(p.name for p in (tp / "checkpoints" / f"step{STEPS}").glob("mp_rank_*_model_states.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    _compare(reference, tp)
    result = hf_only(hf, tp / "export_check.pt")  # plain transformers against the trained engine
    assert result["max_logit_diff"] <= TOLERANCE["fp32"] and result["same_greedy_tokens"], result
    _resumed_matches(tp, pretrain_args(tp_cfg, tiny_data, model, tmp_path / "tp2_resumed", STEPS, *common),
                     "recipes/pretrain.py")
