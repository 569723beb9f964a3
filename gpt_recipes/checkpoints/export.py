"""Export a DeepSpeed checkpoint to a Hugging Face model folder, and check the result.

Weights come from DeepSpeed's own consolidation (`zero_to_fp32`), which merges the fp32
master weights of any ZeRO stage and any number of ranks from memory-mapped rank files.
Each weight is gathered and cast to the export dtype in turn, so what is held is one copy
at the export dtype (ZeRO-3: DeepSpeed's lazy tensors gather one weight at a time; ZeRO-2:
its merge builds the whole fp32 vector once, freed as the last weight is cast). Shards are
written from those tensors, and the reference logits computed from them before the
written folder is reloaded, so two copies are never alive together. The folder is written next to its destination and
renamed into place when complete, so an existing folder is never left half-replaced.

After writing, the folder is loaded back with `from_pretrained` and its logits on a fixed
batch are compared with those of the consolidated weights at the same dtype.

A LoRA checkpoint holds only the adapters. Its base model (checked against the weights it
was trained on) gets them back through peft; then either the merged model is written as
above, or the adapter alone in peft's format (fp32, as trained), which
`peft.PeftModel.from_pretrained(base, folder)` loads.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from gpt_recipes import console, faults, folders
from gpt_recipes.checkpoints import model_card
from gpt_recipes.checkpoints.consolidate import consolidated_state_dict, materialize
from gpt_recipes.checkpoints.paths import (
    EXPORT_CHECK,
    MODEL_CONFIG,
    check_intact,
    checkpoints_dir,
    recorded_info,
    resolve_checkpoint,
)
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import ExportMismatch, RecipeExit, UserError, first_line
from gpt_recipes.models import adapters
from gpt_recipes.models.moe import hub_names
from gpt_recipes.parallel import pipeline
from gpt_recipes.parallel.distributed import from_main

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Reloaded logits must match the consolidated weights' at the same dtype: the computation
# is the same, so only kernel-level rounding may differ.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@dataclass
class ExportReport:
    out_dir: Path
    tag: str
    dtype: torch.dtype
    parameters: int
    files: list[str]
    max_logit_diff: float | None


def _load_config(tag_dir: Path) -> PretrainedConfig:
    if not (tag_dir / MODEL_CONFIG).is_file():
        raise UserError(f"checkpoint {tag_dir} has no config.json (the model config); it was not written by these "
                        "recipes or is incomplete")
    try:
        return AutoConfig.from_pretrained(tag_dir)
    except Exception as err:
        raise UserError(f"checkpoint {tag_dir} has an unreadable config.json: {first_line(err)}")


def default_dtype(training_precision: str | None) -> torch.dtype:
    """Save at the precision the model was trained in (its fp32 master weights cast to it)."""
    return DTYPES.get(training_precision or "fp32", torch.float32)


def _empty_model(config: PretrainedConfig):
    """The model's structure with parameters on the meta device (no memory); buffers such as
    rotary frequencies stay real, since checkpoints do not hold non-persistent buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.tie_weights()  # the meta placement replaced the tied parameter objects; tie them again
    return model


def _weights_to_save(config: PretrainedConfig, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The model's persistent tensors by name, once each: tied duplicates (lm_head = embeddings) dropped."""
    model = _empty_model(config)
    first_name: dict[int, str] = {}
    wanted = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first_name:
            continue
        first_name[id(tensor)] = name
        wanted.append(name)
    missing = [n for n in wanted if n not in state]
    if missing:
        raise UserError(f"checkpoint {where} lacks weights the model config needs: {', '.join(missing[:5])}")
    return {name: state[name] for name in wanted}


def _cast_one_by_one(weights: dict, dtype: torch.dtype) -> None:
    """Gather (if lazy) and cast each weight in place, so the fp32 originals go as the casts come."""
    for name in list(weights):
        tensor = materialize(weights[name])
        weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor


def _write_weights(weights: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_size: str) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    # Plan shards from sizes at the target dtype without materialising any cast tensor.
    sizes = {n: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
             for n, t in weights.items()}
    split = split_torch_state_dict_into_shards(sizes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: (weights[n].to(dtype) if weights[n].is_floating_point() else weights[n]).contiguous()
                 for n in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def verification_batch(config: PretrainedConfig, batch: int = 2, length: int = 32) -> torch.Tensor:
    """A fixed batch of token ids, the same in every process that asks for it."""
    length = min(length, getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", length))
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def _reference_logits(config: PretrainedConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                      input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the consolidated weights at the export dtype. Consumes `weights`: each tensor
    is cast in place, so the fp32 copy shrinks as the cast copy grows."""
    for name in list(weights):
        if weights[name].is_floating_point():
            weights[name] = weights[name].to(dtype)
    model = _empty_model(config)
    model.load_state_dict(weights, strict=False, assign=True)  # shares the tensors: no extra copy
    weights.clear()
    model.tie_weights()
    return logits_of(model.eval(), input_ids)


EXPORT_KIND = "Hugging Face export"


def check_output_folder(out_dir: Path, force: bool, force_flag: str = "--overwrite") -> None:
    """An export may replace only an earlier export (when asked), never anyone else's folder."""
    folders.check_replaceable(out_dir, EXPORT_KIND, force, force_flag)


def check_shard_size(max_shard_size: str) -> None:
    """A size huggingface_hub's shard planner reads (a number with TB, GB, MB or KB), above zero."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([TGMK]B)\s*", max_shard_size, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--max_shard_size {max_shard_size!r} is not a positive size such as 2GB, 500MB or 100KB")


def export(checkpoint: str | Path, out_dir: str | Path, tag: str | None = None, dtype: str | None = None,
           max_shard_size: str = "2GB", force: bool = False, verify: bool = True, log=print,
           adapter: bool = False, base_model: str | None = None) -> ExportReport:
    """Write checkpoint `tag` as a Hugging Face model folder (a LoRA checkpoint merged into its base),
    or with `adapter` a LoRA checkpoint's adapter alone; verify it by reloading."""
    check_shard_size(max_shard_size)
    ckpt_dir, tag = resolve_checkpoint(checkpoint, tag)
    tag_dir = ckpt_dir / tag
    check_intact(tag_dir, "export it with --tag {tag}")
    out_dir = Path(out_dir)
    config = _load_config(tag_dir)
    tokenizer = load_tokenizer(tag_dir) if (tag_dir / "tokenizer_config.json").is_file() else None
    if tokenizer is None:
        raise UserError(f"checkpoint {tag_dir} has no tokenizer files; it was not written by these recipes")
    info = recorded_info(tag_dir)
    lora = info.get("adapter")
    if (adapter or base_model) and not lora:
        raise UserError(f"{'--adapter' if adapter else '--base_model'}: checkpoint {tag_dir} holds a whole model, "
                        "not LoRA adapters")
    if adapter:
        if dtype not in (None, "fp32"):
            raise UserError("--dtype: an adapter is exported in fp32, as trained; the base keeps its own dtype")
        return _export_adapter(ckpt_dir, tag, out_dir, lora, base_model, tokenizer, force, verify, log)
    target = _target_dtype(dtype, info, log)
    check_output_folder(out_dir, force)
    with folders.written_aside(out_dir, EXPORT_KIND, force) as tmp, folders.disk_failures_said(out_dir):
        log(f"Consolidating {tag_dir} (ZeRO-{info.get('zero_stage', '?')}, {info.get('world_size', '?')} ranks)")
        with console.heartbeat(f"exporting {tag_dir.name}"):
            weights = _final_weights(ckpt_dir, tag, config, lora, base_model, target, log)
            params = sum(t.numel() for t in weights.values())
            files = _write_weights(hub_names(_empty_model(config), weights), tmp, target, max_shard_size)
            _write_configs(tmp, config, tokenizer, target)
            model_card.write(tmp, out_dir, tag_dir)
            diff = _verify(tmp, config, weights, target, log) if verify else None
        folders.mark(tmp, EXPORT_KIND, checkpoint=tag_dir.resolve(), dtype=_name(target),
                     max_logit_diff_vs_checkpoint=diff)
    log(f"Exported {params / 1e6:.2f}M parameters to {out_dir} ({', '.join(files)})")
    return ExportReport(out_dir, tag, target, params, files, diff)


def refresh_card(out_dir: str | Path, log=print) -> Path:
    """Write the model card of an existing export again, from its checkpoint's run as it is now (an
    evaluation since, say), without touching the weights; returns the card's path."""
    import os

    out_dir = Path(out_dir)
    if not folders.written_here(out_dir, EXPORT_KIND):
        raise UserError(f"{out_dir} is not a Hugging Face export written by these tools; export a checkpoint into it first")
    marker = json.loads((out_dir / folders.MARKER).read_text())
    tag_dir = Path(marker.get("checkpoint", ""))
    if not (tag_dir / "training.json").is_file():
        raise UserError(f"the checkpoint {out_dir} was exported from, {tag_dir}, is gone; its card cannot be rebuilt")
    fresh = out_dir / f".{model_card.CARD}.new"  # written whole, then put in place in one step
    model_card.build(out_dir.resolve(), tag_dir, adapter="adapter_of" in marker).save(fresh)
    os.replace(fresh, out_dir / model_card.CARD)
    folders.plain_permissions(out_dir)
    log(f"Wrote the model card {out_dir / model_card.CARD} from {tag_dir} (the weights are unchanged)")
    return out_dir / model_card.CARD


def _target_dtype(dtype: str | None, info: dict[str, Any], log) -> torch.dtype:
    """The dtype asked for (--dtype), or the training precision's, said."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    target = default_dtype(info.get("precision"))
    log(f"Saving weights in {_name(target)}: the training precision ({info.get('precision', 'unknown')}); "
        + ("a tensor-parallel checkpoint holds the weights the engine computes with, in that precision"
           if info.get("tensor_parallel", 1) > 1 else
           "the fp32 master weights are cast to it (--dtype fp32 keeps them exactly)"))
    return target


def _final_weights(ckpt_dir: Path, tag: str, config: PretrainedConfig, lora: dict | None, base_model: str | None,
                   target: torch.dtype, log) -> dict[str, torch.Tensor]:
    """The checkpoint's whole weights (LoRA adapters merged into their base), under the model's names, cast."""
    if lora:
        adapted = _adapted_model(ckpt_dir, tag, lora, base_model, log)
        log(f"Merging the LoRA adapters into {adapted.peft_config['default'].base_model_name_or_path}")
        state = adapted.merge_and_unload().state_dict()
        del adapted
    else:
        state = consolidated_state_dict(ckpt_dir, tag, lazy=True)
    weights = _weights_to_save(config, state, ckpt_dir / tag)
    del state
    _cast_one_by_one(weights, target)
    gc.collect()
    return weights


def _write_configs(folder: Path, config: PretrainedConfig, tokenizer, target: torch.dtype) -> None:
    config.dtype = target
    config.save_pretrained(folder)
    generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id = tokenizer.eos_token_id
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _verify(folder: Path, config: PretrainedConfig, weights: dict[str, torch.Tensor], target: torch.dtype,
            log) -> float:
    """The reloaded folder's logits against the checkpoint's weights' on a fixed batch; a mismatch stops
    the export before the folder takes its place."""
    batch = verification_batch(config)
    expected = _reference_logits(config, weights, target, batch)
    gc.collect()
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=target).eval()
    diff = (logits_of(reloaded, batch) - expected).abs().max().item()
    del reloaded
    log(f"Verified: reloaded logits differ from the checkpoint's by at most {diff:.3g} ({_name(target)})")
    if not diff <= VERIFY_TOLERANCE[target]:
        raise ExportMismatch(f"export check failed: reloaded logits differ by {diff:.3g} "
                             f"(> {VERIFY_TOLERANCE[target]:g}); the folder was not written")
    return diff


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _adapted_model(ckpt_dir: Path, tag: str, lora: dict, base_model: str | None, log):
    """A LoRA checkpoint's base (fp32) with its trained adapters, as a peft model."""
    tag_dir = ckpt_dir / tag
    base = adapters.find_base(lora, base_model, tag_dir)
    log(f"Base model: {base} (weights match the ones trained on)")
    adapted = adapters.load_adapted(base, tag_dir, consolidated_state_dict(ckpt_dir, tag), tag_dir)
    adapted.peft_config["default"].base_model_name_or_path = base
    return adapted


def _export_adapter(ckpt_dir: Path, tag: str, out_dir: Path, lora: dict, base_model: str | None, tokenizer,
                    force: bool, verify: bool, log) -> ExportReport:
    """peft's adapter folder (adapter_config.json naming the base, adapter weights in fp32) plus the tokenizer."""
    check_output_folder(out_dir, force)
    tag_dir = ckpt_dir / tag
    with folders.written_aside(out_dir, EXPORT_KIND, force) as tmp, folders.disk_failures_said(out_dir):
        adapted = _adapted_model(ckpt_dir, tag, lora, base_model, log)
        adapted.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model_card.write(tmp, out_dir, tag_dir, adapter=True)  # in place of peft's template
        params = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n or "modules_to_save" in n)
        diff = None
        if verify:
            batch = verification_batch(adapted.config)
            expected = logits_of(adapted, batch)
            del adapted
            gc.collect()
            diff = (logits_of(load_adapter_folder(tmp, torch.float32), batch) - expected).abs().max().item()
            log(f"Verified: the reloaded adapter on its base gives logits within {diff:.3g} of the checkpoint's (fp32)")
            if not diff <= VERIFY_TOLERANCE[torch.float32]:
                raise ExportMismatch(f"export check failed: reloaded logits differ by {diff:.3g} "
                                     f"(> {VERIFY_TOLERANCE[torch.float32]:g}); the folder was not written")
        folders.mark(tmp, EXPORT_KIND, checkpoint=tag_dir.resolve(), adapter_of=lora["base_model"],
                     max_logit_diff_vs_checkpoint=diff)
        files = sorted(p.name for p in tmp.iterdir() if p.name.startswith("adapter_"))
    log(f"Exported a LoRA adapter of {params / 1e6:.3f}M parameters to {out_dir} ({', '.join(files)})")
    return ExportReport(out_dir, tag, torch.float32, params, files, diff)


def load_adapter_folder(folder: Path, dtype: torch.dtype):
    """An exported adapter on its base, loaded as a user would: transformers for the base, peft for the adapter."""
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(folder).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, folder).eval()


@dataclass
class EngineCheck:
    """What the trained engine computes on the verification batch, to compare an export with."""

    input_ids: torch.Tensor
    logits: torch.Tensor
    generated: torch.Tensor  # greedy continuation of input_ids[:1, :PROMPT_TOKENS]
    dtype: torch.dtype  # the engine's compute dtype

    def save(self, path: Path) -> None:
        torch.save({"input_ids": self.input_ids, "logits": self.logits, "generated": self.generated,
                    "dtype": _name(self.dtype)}, path)


PROMPT_TOKENS = 8
NEW_TOKENS = 16


@torch.no_grad()
def engine_check(engine, config: PretrainedConfig, eos_token_id: int, zero_stage: int) -> EngineCheck:
    """Run on every rank: under ZeRO-3 each forward gathers parameters collectively."""
    batch = verification_batch(config)
    if pipeline.is_pipeline(engine.module):  # each forward runs through every stage
        generated = batch[:1, :PROMPT_TOKENS]
        for _ in range(NEW_TOKENS):
            step_logits = pipeline.logits(engine, generated.to(engine.device))
            generated = torch.cat([generated, step_logits[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
        return EngineCheck(batch, pipeline.logits(engine, batch.to(engine.device)).cpu(), generated,
                           next(engine.module.parameters()).dtype)
    engine.eval()
    logits = engine(input_ids=batch.to(engine.device)).logits.float().cpu()
    generated = engine.module.generate(
        batch[:1, :PROMPT_TOKENS].to(engine.device), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=eos_token_id, synced_gpus=zero_stage == 3 and torch.distributed.get_world_size() > 1,
    ).cpu()
    engine.train()
    return EngineCheck(batch, logits, generated, next(engine.module.parameters()).dtype)


def compare_with_engine(out_dir: Path, check: EngineCheck, adapter: bool = False) -> tuple[float, bool, float]:
    """(max |logits difference|, same greedy tokens, the tolerance at the folder's dtype) between an
    exported folder and the engine. An adapter is loaded onto its base at the engine's dtype."""
    model = (load_adapter_folder(out_dir, check.dtype) if adapter
             else AutoModelForCausalLM.from_pretrained(out_dir).eval())
    diff = (logits_of(model, check.input_ids) - check.logits).abs().max().item()
    prompt = check.input_ids[:1, :PROMPT_TOKENS]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=model.generation_config.pad_token_id)
    return diff, torch.equal(generated, check.generated), VERIFY_TOLERANCE[model.dtype]


def export_after_training(engine, run_dir: Path, config: PretrainedConfig, eos_token_id: int, zero_stage: int,
                          is_main: bool, force: bool, export_dir: Path | None = None,
                          adapter_dir: Path | None = None, log=print) -> dict | None:
    """Export the run's final checkpoint (written by every rank) and check it against the live engine:
    as a model folder to export_dir (LoRA merged), and a LoRA run's adapter alone to adapter_dir.

    Call on every rank after the final save. Rank 0 exports; the engine's logits and greedy
    tokens on a fixed batch are compared with the reloaded folder's and stored in
    RUN_DIR/export_check.pt so the comparison can be repeated in any other process. An export
    that fails either check ends the run on every rank with ExportMismatch (the checkpoint stays).
    """
    check = engine_check(engine, config, eos_token_id, zero_stage)
    record, problem = {}, None
    if is_main:
        check.save(run_dir / EXPORT_CHECK)
        targets = [(d, key, d == adapter_dir) for d, key in ((export_dir, "export"), (adapter_dir, "adapter_export"))
                   if d is not None]
        for out_dir, key, adapter in targets:
            try:
                export(run_dir, out_dir, force=force, log=log, adapter=adapter)
            except RecipeExit as err:
                problem = f"export to {out_dir} failed: {err}"
                break
            diff, same_tokens, tolerance = compare_with_engine(out_dir, check, adapter)
            diff += faults.export_skew()
            log(f"{'Adapter' if adapter else 'Export'} vs trained engine: max |logits difference| {diff:.3g}; "
                f"greedy tokens {'identical' if same_tokens else 'DIFFER'}")
            record.update({f"{key}_dir": str(out_dir), f"{key}_logit_diff_vs_engine": diff,
                           f"{key}_same_greedy_tokens": same_tokens})
            if not (diff <= tolerance and same_tokens):
                problem = (f"the export in {out_dir} does not reproduce the trained engine: max |logits "
                           f"difference| {diff:.3g} (tolerance {tolerance:g}), greedy tokens "
                           f"{'identical' if same_tokens else 'differ'}")
                break
    problem = from_main(problem)
    if problem:
        raise ExportMismatch(f"{problem}; the checkpoint in {checkpoints_dir(run_dir)} is kept: export it again "
                             "with tools/convert_to_hf.py, and report this if it persists")
    return record
