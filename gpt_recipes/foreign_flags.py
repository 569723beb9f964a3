"""Flags users bring from the Hugging Face Trainer, TRL and nanoGPT, and this project's way to say each.

An unknown flag is answered in one line: the pointer below when it has one, else the closest of
the command's own flags by spelling. Settings the DeepSpeed JSON owns (optimizer, scheduler,
batch sizes, precision, clipping) are pointed at the JSON and `--ds`, never given a second flag.
"""

from __future__ import annotations

import difflib
import re

# name as typed (without dashes) -> (this project's way, the flags of ours it names). A pointer is
# given only by a command that has every flag it names.
POINTERS: dict[str, tuple[str, tuple[str, ...]]] = {}


def _point(names: str, way: str, *needs: str) -> None:
    for name in names.split():
        POINTERS[name] = (way, needs)


_point("learning_rate lr", "the learning rate is the DeepSpeed JSON's: --ds optimizer.params.lr=VALUE for one run, "
       "or optimizer.params.lr in the file", "ds")
_point("weight_decay", "weight decay is the DeepSpeed JSON's: --ds optimizer.params.weight_decay=VALUE", "ds")
_point("adam_beta1 adam_beta2 beta1 beta2", "Adam's betas are the DeepSpeed JSON's: --ds "
       "optimizer.params.betas=[0.9,0.95]", "ds")
_point("adam_epsilon", "Adam's epsilon is the DeepSpeed JSON's: --ds optimizer.params.eps=VALUE", "ds")
_point("optim optimizer", "the optimizer is the DeepSpeed JSON's optimizer section (type and params)", "ds")
_point("per_device_train_batch_size per_device_eval_batch_size batch_size micro_batch_size train_batch_size",
       "batch sizes are the DeepSpeed JSON's: --ds train_micro_batch_size_per_gpu=N (and "
       "gradient_accumulation_steps); the global batch is micro x accumulation x data-parallel ranks", "ds")
_point("gradient_accumulation_steps grad_accum", "--ds gradient_accumulation_steps=N (the DeepSpeed JSON owns it)",
       "ds")
_point("max_grad_norm grad_clip", "clipping is the DeepSpeed JSON's: --ds gradient_clipping=1.0", "ds")
_point("warmup_steps warmup_iters warmup_ratio lr_scheduler_type lr_decay_iters min_lr decay_lr",
       "the schedule is the DeepSpeed JSON's scheduler section: e.g. --ds scheduler.params.warmup_num_steps=N", "ds")
_point("bf16 fp16 dtype", "precision is the DeepSpeed JSON's: bf16.enabled or fp16.enabled (e.g. "
       "ds_configs/zero2_fp16.json, or --ds bf16.enabled=false for fp32)", "ds")
_point("zero_stage", "the ZeRO stage is the DeepSpeed JSON's: --deepspeed_config ds_configs/zero3.json (or "
       "--ds zero_optimization.stage=3)", "deepspeed_config")
_point("deepspeed", "--deepspeed_config FILE", "deepspeed_config")
_point("gradient_checkpointing", "--activation_checkpointing", "activation_checkpointing")
_point("report_to wandb_log wandb_project logging_dir", "metrics go to OUTPUT_DIR/metrics.jsonl; for Weights & "
       "Biases (offline), TensorBoard or CSV add the DeepSpeed JSON's monitor sections: --ds wandb.enabled=true "
       "(see docs/monitoring_and_evaluation.md)", "ds")
_point("num_train_epochs", "--num_epochs", "num_epochs")
_point("max_iters", "--max_steps", "max_steps")
_point("logging_steps log_interval_steps", "--log_interval", "log_interval")
_point("eval_steps", "--eval_interval", "eval_interval")
_point("eval_iters", "--eval_batches", "eval_batches")
_point("save_steps", "--save_interval", "save_interval")
_point("save_total_limit", "--keep_last", "keep_last")
_point("resume_from_checkpoint", "--resume (the newest checkpoint of --output_dir) or --resume_from TAG", "resume")
_point("overwrite_output_dir", "--overwrite", "overwrite")
_point("block_size max_seq_length max_length", "--seq_len", "seq_len")
_point("compile", "--torch_compile", "torch_compile")
_point("model_name model_name_or_path init_from", "--model_name_or_path (fine-tuning recipes) or --model "
       "(pretraining: a built-in name or a config JSON)", "deepspeed_config")
_point("n_layer n_head n_embd", "--model with a config JSON that sets it (see --list_models)", "model")
_point("dataset dataset_name train_file", "--data", "data")
_point("peft lora", "--use_peft (with --lora_r, --lora_alpha, --lora_dropout, --lora_target_modules)", "use_peft")


def explain_unknown(flag: str, known: list[str]) -> str:
    """One line for an unknown flag `flag` (as typed) of a command whose flags are `known` (with dashes)."""
    name = re.sub(r"^-+", "", flag.split("=", 1)[0]).replace("-", "_")
    usable = {f"--{n}": way for n, (way, needs) in POINTERS.items() if all(f"--{need}" in known for need in needs)}
    if f"--{name}" in usable:
        return f"unrecognized argument --{name}; here: {usable[f'--{name}']}"
    close = difflib.get_close_matches(f"--{name}", [*known, *usable], n=1, cutoff=0.75)
    if not close:
        return f"unrecognized argument --{name}; see --help"
    if close[0] in known:
        return f"unrecognized argument --{name}; did you mean {close[0]}?"
    return f"unrecognized argument --{name} ({close[0]}?); here: {usable[close[0]]}"
