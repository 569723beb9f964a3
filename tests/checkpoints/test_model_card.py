"""The model card an export carries, from a run's records alone (no ranks): what a fine-tune, a LoRA
adapter and a preference run say of their base, method and results."""

import json

import pytest
from huggingface_hub import ModelCard

from gpt_recipes.checkpoints import model_card


def _run(tmp_path, recipe: str, objective: str, adapter: bool, lines: list[dict]) -> tuple:
    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / "step4"
    tag_dir.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "recipe": recipe, "args": {"data": ["data/dpo_demo/train.jsonl"], "model_name_or_path": "exported/finetuned",
                                   "deepspeed_config": "ds_configs/zero3_dpo.json"},
        "deepspeed": {"optimizer": {"type": "AdamW", "params": {"lr": 5e-6}}, "gradient_clipping": 1.0},
        "versions": {"torch": "2.13.0+cpu", "deepspeed": "0.19.8"}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    info = {"recipe": recipe, "objective": objective, "precision": "bf16", "world_size": 2, "zero_stage": 3,
            "step": 4, "tokens": 1000, "global_batch": 8, "seq_len": 128, "seed": 1234}
    if adapter:
        info["adapter"] = {"base_model": "exported/finetuned"}
    (tag_dir / "training.json").write_text(json.dumps(info))
    return run, tag_dir


@pytest.mark.parametrize("adapter", [False, True], ids=["merged", "adapter folder"])
def test_a_preference_runs_card_names_its_base_method_and_results(tmp_path, adapter):
    lines = [{"step": 0, "val_loss": 0.6931, "val_reward_accuracy": 0.5},
             {"step": 2, "loss": 0.65},
             {"step": 4, "val_loss": 0.61, "val_reward_accuracy": 0.75, "val_reward_margin": 0.4},
             {"step": 6, "val_loss": 0.1}]  # after this checkpoint: not its result
    run, tag_dir = _run(tmp_path, "dpo", "dpo", adapter, lines)
    model_card.write(tmp_path, tmp_path / "exported" / "dpo", tag_dir, adapter=adapter)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "exported/finetuned"
    assert data["base_model_relation"] == ("adapter" if adapter else "finetune")
    assert data["library_name"] == ("peft" if adapter else "transformers")
    assert {"dpo", "zero-3"} <= set(data["tags"]) and ("lora" in data["tags"]) is adapter
    assert data["datasets"] == ["data/dpo_demo/train.jsonl"]
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"val_loss": 0.61, "val_reward_accuracy": 0.75, "val_reward_margin": 0.4,
                       "best_val_loss": 0.61}
    assert "| optimizer | AdamW {\"lr\": 5e-06} |" in card.text and "- deepspeed 0.19.8" in card.text
    assert ("AutoPeftModelForCausalLM" in card.text) is adapter


def test_a_pretraining_card_has_no_base_and_a_run_without_evaluations_says_so(tmp_path):
    _, tag_dir = _run(tmp_path, "pretrain", "next_token", False, [{"step": 2, "loss": 6.0}])
    card = model_card.build(tmp_path / "exported" / "mine", tag_dir)
    assert "base_model" not in card.data.to_dict() and "model-index" not in card.data.to_dict()
    assert "pretrained from scratch" in card.text and "(no evaluation recorded)" in card.text
