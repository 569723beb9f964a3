"""Pipeline parallelism: P=2 on 2 ranks against 1 rank on the same samples
(tied GPT-2 and untied Llama), exact resume after SIGTERM, and the export."""

import json
import re

import pytest
import torch

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from tests.helpers import TINY_LLAMA, ds_json, hf_only, launch, pretrain_args, read_metrics, run_python


def _pipeline_json(tmp_path, stages: int) -> str:
    path = tmp_path / f"pp{stages}.json"
    cfg = json.loads(open(ds_json(tmp_path, 1, micro=2, accum=2, fp32=True)).read())
    if stages > 1:
        cfg["pipeline"] = {"stages": stages}
    path.write_text(json.dumps(cfg))
    return str(path)


STEPS = 8


def _run(tmp_path, tiny_data, model, name, ranks, stages, *extra, fault=None):
    out = tmp_path / name
    args = pretrain_args(_pipeline_json(tmp_path, stages), tiny_data, model, out, STEPS, "--seq_len", "32",
                         "--log_interval", "1", "--eval_interval", "4", "--eval_batches", "2", "--save_interval", "4",
                         *extra)
    if ranks == 1:  # the reference: plain python, no launcher
        proc = run_python("recipes/pretrain.py", args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        proc = launch("recipes/pretrain.py", args, ranks=ranks, check=fault is None, fault=fault)
    return out, proc


def _compare(pipe_out, one_out):
    (pipe, pipe_evals), (one, one_evals) = read_metrics(pipe_out), read_metrics(one_out)
    assert [r["step"] for r in pipe] == list(range(1, STEPS + 1))
    for a, b in zip(pipe, one):
        assert abs(a["loss"] - b["loss"]) <= 2e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-5 * b["grad_norm"], (a, b)
    for a, b in zip(pipe_evals, one_evals):
        assert abs(a["val_loss"] - b["val_loss"]) <= 2e-5, (a, b)
    ours = consolidated_state_dict(pipe_out / "checkpoints", f"step{STEPS}")
    reference = consolidated_state_dict(one_out / "checkpoints", f"step{STEPS}")
    reference = {k: v for k, v in reference.items() if k in ours or k != "lm_head.weight"}  # tied: one copy
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    assert worst <= 5e-5, worst


@pytest.mark.slow
def test_a_tied_gpt2_pipeline_trains_as_one_rank_resumes_exactly_and_exports(tmp_path, tiny_data, tiny_model):
    pipe_out, proc = _run(tmp_path, tiny_data, tiny_model, "pp", 2, 2, "--export_hf", str(tmp_path / "hf"))
    assert "Pipeline: stage 0: layers 0-2, stage 1: layers 3-5 of 6" in proc.stdout, proc.stdout
    # The lines other runs print, and none of DeepSpeed's layer listing or autograd warnings.
    assert re.search(r"Model: [\d.]+M parameters", proc.stdout), proc.stdout
    assert "SEED_LAYERS" not in proc.stdout and "stage=0 layers=" not in proc.stdout, proc.stdout
    assert "c10d::broadcast_" not in proc.stderr, proc.stderr[-2000:]
    one_out, _ = _run(tmp_path, tiny_data, tiny_model, "one", 1, 1)
    _compare(pipe_out, one_out)
    # The export reloads in plain transformers to the engine's logits, with its greedy tokens.
    result = hf_only(tmp_path / "hf", pipe_out / "export_check.pt")
    assert result["max_logit_diff"] <= 1e-4 and result["same_greedy_tokens"], result
    # Stopped by SIGTERM after step 5 (a checkpoint at 5), resumed: the same steps 6..8.
    part_out, proc = _run(tmp_path, tiny_data, tiny_model, "part", 2, 2, fault="sigterm@5:1")
    assert proc.returncode == 143, proc.stderr[-2000:]
    _run(tmp_path, tiny_data, tiny_model, "part", 2, 2, "--resume")
    full, part = read_metrics(pipe_out)[0], read_metrics(part_out)[0]
    assert [r["step"] for r in part] == list(range(1, STEPS + 1))
    for a, b in zip(full[5:], part[5:]):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"], (a, b)


@pytest.mark.slow
def test_an_untied_llama_pipeline_trains_as_one_rank(tmp_path, tiny_data, tiny_llama):
    assert TINY_LLAMA["tie_word_embeddings"] is False
    pipe_out, _ = _run(tmp_path, tiny_data, tiny_llama, "pp", 2, 2)
    one_out, _ = _run(tmp_path, tiny_data, tiny_llama, "one", 1, 1)
    _compare(pipe_out, one_out)
    assert torch.load(next((pipe_out / "checkpoints" / f"step{STEPS}").glob("layer_04-*model_states.pt")),
                      weights_only=True)["module.weight"].shape[0] > TINY_LLAMA["hidden_size"]  # the head's own file


def test_a_pipeline_evaluates_each_source_of_a_mixture():
    """Each validation micro-batch comes from one source; the pipeline's evaluation keeps their losses apart."""
    from types import SimpleNamespace

    import numpy as np

    from gpt_recipes.train.lm import PipelineStep

    class Val:
        source_names = ("code", "prose")

        def batch(self, idx):
            return {"input_ids": torch.zeros(len(idx), 4, dtype=torch.long)}, torch.zeros(len(idx), 4, dtype=torch.long)

        def source_of(self, index):
            return int(index >= 10)

    losses = iter([2.0, 4.0, 7.0])  # code, code, prose: the engine's mean loss of each micro-batch
    engine = SimpleNamespace(reset_activation_shape=lambda: None, train=lambda: None,
                             eval_batch=lambda *a, **k: next(losses))
    step = object.__new__(PipelineStep)
    step.batches = SimpleNamespace(val=Val(), val_micro_batches=[np.array([0, 1]), np.array([2, 3]), np.array([10, 11])])
    result = step.evaluate(engine)
    assert result["val_loss_by_source"] == {"code": 3.0, "prose": 7.0} and abs(result["val_loss"] - 13 / 3) < 1e-12
    assert abs(result["val_ppl"] - 2.718281828 ** (13 / 3)) < 1e-3
