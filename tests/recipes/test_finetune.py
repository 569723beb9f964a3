"""Fine-tuning end to end on 2 ranks: from a model exported by the export tool, back to an export."""

import json
import os

import pytest
from transformers import AutoTokenizer

from tests.helpers import TOLERANCE, ds_json, hf_only, launch, read_metrics, run_here

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage, pack", [(3, False), (2, True)])
def test_finetune_from_export_then_export_again(tmp_path, pretrained, demo, stage, pack):
    out, hf = tmp_path / "run", tmp_path / "hf"
    args = ["--deepspeed_config", ds_json(tmp_path, stage, micro=4), "--model_name_or_path", str(pretrained),
            "--data", str(demo / "train.jsonl"), "--output_dir", str(out), "--max_steps", "30",
            "--eval_interval", "0", "--eval_batches", "10", "--truncate", "--export_hf", str(hf)]
    proc = launch("recipes/finetune.py", args + (["--pack"] if pack else []))
    assert "dropped" in proc.stdout and "truncated" in proc.stdout  # the length policy is reported
    train, evals = read_metrics(out)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals  # held-out response loss falls
    result = hf_only(hf, out / "export_check.pt")
    assert result["max_logit_diff"] <= TOLERANCE["bf16"] and result["same_greedy_tokens"], result
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.chat_template and (hf / "chat_template.jinja").is_file()  # the template trained with travels
    from huggingface_hub import ModelCard
    from transformers import GenerationConfig

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert "What does json.dumps do?" in prompt
    generation = GenerationConfig.from_pretrained(hf)
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id is not None
    card = ModelCard.load(hf / "README.md").data.to_dict()
    assert card["base_model"] == str(pretrained) and card["base_model_relation"] == "finetune"
    assert {"finetune", "full", f"zero-{stage}"} <= set(card["tags"])


def test_a_weighted_mixture_of_files_resumes_exactly_after_sigterm(tmp_path, pretrained, demo):
    # Two files of the demo, weighted 3:1, each with its own held-out rows.
    rows = (demo / "train.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(rows[:600]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(rows[600:900]) + "\n")

    def run(out, *extra, check=True):
        args = ["--deepspeed_config", ds_json(tmp_path, 3, micro=4, fp32=True), "--model_name_or_path",
                str(pretrained), "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--data_weights",
                "3", "1", "--val_fraction", "0.05", "--output_dir", str(out), "--max_steps", "10", "--log_interval",
                "1", "--eval_interval", "5", "--eval_batches", "2", "--save_interval", "5", "--truncate", *extra]
        return launch("recipes/finetune.py", args, check=check)

    proc = run(tmp_path / "full")
    assert "Mixture: a 75.0% (" in proc.stdout and "b 25.0% (" in proc.stdout, proc.stdout
    os.environ["GPT_RECIPES_FAULT"] = "sigterm@4:1"
    try:
        proc = run(tmp_path / "part", check=False)
    finally:
        os.environ.pop("GPT_RECIPES_FAULT")
    assert proc.returncode == 143, proc.stderr[-2000:]
    run(tmp_path / "part", "--resume")
    (full, full_evals), (part, part_evals) = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == list(range(1, 11))
    for a, b in zip(full[4:], part[4:]):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["tokens"] == b["tokens"], (a, b)
        assert a["source_samples"] == b["source_samples"], (a, b)
    for r in full:  # global batch 8: the shares follow 3:1 within one example at every step
        taken = r["source_samples"]
        assert taken["a"] + taken["b"] == 8 * r["step"] and abs(taken["a"] - 6 * r["step"]) < 1, r
    last = full_evals[-1]
    assert set(last["val_loss_by_source"]) == {"a", "b"}, last
    assert part_evals[-1]["val_loss_by_source"] == pytest.approx(last["val_loss_by_source"], abs=1e-6)


def test_bad_rows_stop_with_file_and_row(tmp_path, pretrained):
    data = tmp_path / "bad.jsonl"
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, {"prompt": "d", "response": "e"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_here("recipes/finetune.py", ["--deepspeed_config", ds_json(tmp_path, 2, micro=2),
                                              "--model_name_or_path", str(pretrained), "--data", str(data),
                                              "--val_data", str(data), "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data} row 2: needs 'messages', or 'prompt' and 'response' (missing response)")


def test_model_that_does_not_exist(tmp_path):
    proc = run_here("recipes/finetune.py", ["--model_name_or_path", str(tmp_path / "nothing"),
                                              "--output_dir", str(tmp_path / "out")])
    assert proc.returncode == 2 and "does not exist" in proc.stderr.strip().splitlines()[-1]
