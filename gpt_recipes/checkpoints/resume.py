"""What a resume checks before any rank starts: the checkpoint is intact and was trained with this
run's model, tokenizer, data, batch, sequence length, objective and trained weights, on a layout
this run can continue from."""

from __future__ import annotations

import json
from typing import Any

from gpt_recipes.checkpoints import paths
from gpt_recipes.console import resume_command
from gpt_recipes.data.tokenizer import load_tokenizer, vocabulary_digest
from gpt_recipes.errors import UserError
from gpt_recipes.parallel.layout import Layout

# Model config fields that name tokens or record versions: not the model's shape.
NOT_THE_SHAPE = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


def model_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first shape-deciding field (model type, sizes, tying) in which two model configs differ."""
    keys = ["model_type", "tie_word_embeddings", *sorted(k for k, v in saved.items()
                                                         if isinstance(v, int) and not isinstance(v, bool)
                                                         and k not in NOT_THE_SHAPE)]
    for key in keys:
        if key in saved and saved.get(key) != current.get(key):
            return f"{key} {saved.get(key)!r} (this run: {current.get(key)!r})"
    return None


def check_matches(run, job) -> list[str]:
    """One line naming what differs between the checkpoint `run` resumes and this run's `job`;
    returns notes to say (a moved base model). Nothing to check for a fresh run."""
    tag = run.output.resume_tag
    if not tag:
        return []
    tag_dir = paths.checkpoints_dir(run.out_dir) / tag
    paths.check_intact(tag_dir, "point {ckpt_dir}/latest at it (echo {tag} > {ckpt_dir}/latest), then continue "
                                "with: " + resume_command().replace("{", "{{").replace("}", "}}"))
    saved = paths.saved_info(tag_dir.parent, tag)
    where = f"--resume: checkpoint {tag_dir} was trained with"
    note = job.weights.check_resume(saved.get("adapter"), tag_dir)  # the same kind of run, on the same base
    _check_model_and_tokenizer(tag_dir, saved, job, where)
    if saved.get("data_fingerprint") and job.data_fingerprint and saved["data_fingerprint"] != job.data_fingerprint:
        raise UserError(f"{where} other data (fingerprint {saved['data_fingerprint']}, this run's "
                        f"{job.data_fingerprint}); resume with the --data it was trained on, or start a new run "
                        "from its export")
    if (saved.get("global_batch"), saved.get("seq_len")) != (run.batch.global_batch, job.seq_len):
        raise UserError(
            f"{where} global batch {saved.get('global_batch')} and seq_len {saved.get('seq_len')}; this run has "
            f"{run.batch.global_batch} and {job.seq_len}: keep them to resume (on another number of ranks, change "
            "gradient_accumulation_steps or train_micro_batch_size_per_gpu in the DeepSpeed config so the global "
            "batch stays the same)")
    _check_precision_and_settings(saved, run, job, where)
    if "world_size" in saved and "zero_stage" in saved:  # a layout no conversion can bridge is refused now
        run.layout.resume_change(Layout.from_record(saved))
    return [note] if note else []


def _check_precision_and_settings(saved: dict[str, Any], run, job, where: str) -> None:
    """The precision the checkpoint's weights and optimizer state are in, and the objective's settings
    (GRPO's generations and rewards, DPO's beta, ...), as the run that wrote it had them."""
    from gpt_recipes.ds_config import precision

    if saved.get("precision") and saved["precision"] != precision(run.ds_cfg):
        raise UserError(f"{where} {saved['precision']}, and this run is {precision(run.ds_cfg)}: resume in "
                        f"{saved['precision']} (the DeepSpeed JSON it was trained with), or export it with "
                        "tools/convert_to_hf.py and start a new run from the export")
    for key, value in job.objective.config_record().items():
        if key in saved and json.loads(json.dumps(value)) != saved[key]:
            changed = _differences(saved[key], json.loads(json.dumps(value)))
            raise UserError(f"{where} other {job.objective.title} settings ({changed}); resume with the ones it was "
                            "trained with, or start a new run from its export")


def _differences(saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        return "; ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted({*saved, *now})
                         if saved.get(k) != now.get(k))
    return f"{saved!r} -> {now!r}"


def _check_model_and_tokenizer(tag_dir, saved: dict[str, Any], job, where: str) -> None:
    model_file = tag_dir / paths.MODEL_CONFIG
    if model_file.is_file():
        differ = model_difference(json.loads(model_file.read_text()), job.model_config.to_dict())
        if differ:
            raise UserError(f"{where} another model: {differ}; resume with the model it was trained with (the "
                            f"--model or --model_name_or_path of the command that started it)")
    digest = saved.get("tokenizer_digest") or (vocabulary_digest(load_tokenizer(tag_dir))
                                               if (tag_dir / "tokenizer_config.json").is_file() else None)
    if digest and digest != vocabulary_digest(job.tokenizer):
        raise UserError(f"{where} another tokenizer (its vocabulary differs from this run's, token for token); "
                        "resume with the data prepared with the run's tokenizer: tools/prepare_data.py --tokenizer "
                        f"{tag_dir} ...")
