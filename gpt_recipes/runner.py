"""What every recipe does once it knows its model and data: check, start ranks, train, save, export.

A recipe checks its own inputs (data, tokenizer, model) and hands over a Job; `plan_run`
checks the shared ones (intervals, DeepSpeed JSON, output folders) before any rank starts,
and `execute` runs the rest of the story on every rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from transformers import PretrainedConfig, PreTrainedModel

from gpt_recipes import ds_config
from gpt_recipes.console import resume_command
from gpt_recipes.args import DEFAULT_DEEPSPEED_CONFIG, RunArgs
from gpt_recipes.checkpoints import paths, saving
from gpt_recipes.checkpoints.export import check_output_folder, export_after_training
from gpt_recipes.checkpoints.run_dir import (
    OutputPlan,
    RunLock,
    check_output_path,
    plan_output_dir,
    remove_previous_run,
    write_run_config,
)
from gpt_recipes.data import mixture
from gpt_recipes.data.tokenizer import load_tokenizer, vocabulary_digest
from gpt_recipes.data.tokens import GlobalBatchOrder, eval_micro_batches
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError
from gpt_recipes.metrics import evaluation, flops
from gpt_recipes.metrics.log import MetricsLog, log_wandb_by_step
from gpt_recipes.metrics.memory import tensor_memory_mb
from gpt_recipes.models import adapters
from gpt_recipes.models.adapters import AdapterPlan
from gpt_recipes.models.causal_lm import count_parameters, enable_activation_checkpointing
from gpt_recipes.models.compile import CompilePlan, plan_compile
from gpt_recipes.models.loss import CausalLMLoss, fused_unavailable
from gpt_recipes.parallel import distributed, pipeline, sequence_tensor
from gpt_recipes.parallel.distributed import DistEnv
from gpt_recipes.train import engine_setup
from gpt_recipes.train.loop import Batches, DataParallelStep, LoopSettings, Samples, TrainState, TrainStep, train


@dataclass
class RunPlan:
    """The shared, checked settings of a run."""

    env: DistEnv
    device: str
    ds_cfg: dict[str, Any]
    batch: BatchPlan
    filled: dict[str, Any]
    out_dir: Path
    output: OutputPlan
    notes: list[str] = field(default_factory=list)  # said once the ranks have started
    eval_tasks: list[Any] = field(default_factory=list)  # lm-evaluation-harness tasks, resolved
    compile: CompilePlan | None = None  # how the model is compiled (None: eagerly)
    lock: RunLock | None = None  # rank 0's lock on the output folder
    overrides: list[str] = field(default_factory=list)  # --ds values applied to the JSON

    def say(self, *text: Any) -> None:
        if self.env.is_main:
            print(*text, flush=True)


@dataclass
class Job:
    """The recipe-specific parts: how to build the model, and what to train and evaluate on."""

    name: str
    model_config: PretrainedConfig
    tokenizer: Any
    seq_len: int
    train: Samples
    val: Samples
    build_model: Callable[[], PreTrainedModel]
    record: dict[str, Any] = field(default_factory=dict)  # extra facts for OUT/config.json
    # What the training samples were made from (a prepared folder's fingerprint, a digest of the
    # rows): a resume must continue on the same data.
    data_fingerprint: str | None = None
    adapter: AdapterPlan | None = None  # LoRA: build_model returns the base with adapters in place
    # Another objective than next-token loss (DPO): its loss, given the model and ZeRO stage, and
    # what must run once the engine exists and before the first step (the reference pass).
    make_loss: Callable[[PreTrainedModel, int], Any] | None = None
    before_training: Callable[[Any, int], None] | None = None  # (engine, resumed step)
    # A step of its own (GRPO generates before it trains): given the engine, batches and ZeRO stage.
    make_step: Callable[[Any, Batches, int], TrainStep] | None = None


def plan_run(args: RunArgs) -> RunPlan:
    """Check the flags, DeepSpeed JSON and output folders every recipe shares."""
    for name in ("max_steps", "log_interval", "eval_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 (only at the end) or positive, got {getattr(args, name)}")
    if args.profile_step < 0:
        raise UserError(f"--profile_step must be 0 (none) or a step number, got {args.profile_step}")
    if args.keep_last < 0:
        raise UserError(f"--keep_last must be 0 (keep all) or positive, got {args.keep_last}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must lie between 0 and 2**32 - 1, got {args.seed}")
    if args.num_epochs is not None and not args.num_epochs > 0:
        raise UserError(f"--num_epochs must be positive, got {args.num_epochs}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak_tflops must be positive, got {args.peak_tflops}")
    env = distributed.environment()
    device = distributed.device_type()
    out_dir = Path(args.output_dir)
    config_path = ds_config.config_path(args.deepspeed_config, DEFAULT_DEEPSPEED_CONFIG)
    ds_cfg, batch, filled = ds_config.resolve(config_path, env.world_size, args.max_steps, device,
                                                out_dir / paths.MONITOR, overrides=args.ds)
    overridden = ds_config.apply_overrides(ds_config.load_config(config_path), args.ds)
    inputs = input_paths(args, config_path)
    check_output_path(out_dir, "--output_dir", inputs)
    output = plan_output_dir(out_dir, args.resume, args.overwrite, args.resume_from)
    # Taken now, before data and model load: a second run into a live folder is refused at once.
    lock = RunLock(out_dir) if env.is_main else None  # held for the life of the process
    if lock is not None and plan_output_dir(out_dir, args.resume, args.overwrite, args.resume_from) != output:
        raise UserError(f"--output_dir {out_dir} changed while this run was starting (another run ended there?); "
                        "start it again")
    if args.export_hf:
        check_output_path(args.export_hf, "--export_hf", inputs, outputs={"--output_dir": out_dir})
        check_output_folder(Path(args.export_hf), args.overwrite, force_flag="--overwrite")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise UserError(f"--eval_limit must be at least 1, got {args.eval_limit}")
    eval_tasks = evaluation.resolve_tasks([t for name in args.eval_tasks for t in name.split(",") if t]) \
        if args.eval_tasks else []
    run = RunPlan(env, device, ds_cfg, batch, filled, out_dir, output, eval_tasks=eval_tasks, lock=lock,
                  compile=plan_compile(args, ds_cfg, batch, device))
    if output.note:
        run.notes.append(output.note)
    for key, (before, now) in overridden.items():
        run.notes.append(f"DeepSpeed config: --ds {key} = {json.dumps(now)} for this run (the JSON has "
                         f"{json.dumps(before) if before != '(not set)' else 'no value'})")
    run.overrides = list(args.ds)
    if args.num_epochs is None:  # else once the training set's size gives the run's length
        keep_saved_schedule(args, run)
    return run


def keep_saved_schedule(args: RunArgs, run: RunPlan) -> None:
    """A resumed run keeps the scheduler step counts it was planned with, and says so."""
    if not run.output.resume_tag:
        return
    saved = paths.saved_info(paths.checkpoints_dir(run.out_dir), run.output.resume_tag)
    for key, (kept, fresh) in ds_config.keep_saved_schedule(run.ds_cfg, run.filled, saved.get("schedule", {})).items():
        run.notes.append(
            f"Resuming keeps the schedule the run was planned with: {key} = {kept} (--max_steps {args.max_steps} "
            f"would make it {fresh}). Past step {kept}, a warm-up/decay schedule stays at its final learning "
            "rate; to plan another, give the scheduler's step counts as numbers in the DeepSpeed JSON")


# Flags that name what a run reads: no output may be one of them, lie inside one or hold one.
INPUT_FLAGS = ("data", "val_data", "model", "model_name_or_path")


def input_paths(args: RunArgs, config_path: str) -> dict[str, list[str]]:
    """{flag: the existing paths it names} for the run's inputs (a preset name is no path)."""
    found: dict[str, list[str]] = {"--deepspeed_config": [config_path]}
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        paths_named = [v for v in (value if isinstance(value, list) else [value]) if v and Path(v).exists()]
        if paths_named:
            found[f"--{name}"] = paths_named
    return found


def check_adapter_resume(run: RunPlan, adapter: AdapterPlan | None) -> None:
    """A resumed checkpoint must be of the same kind (LoRA or not) and adapt the same base."""
    tag = run.output.resume_tag
    if tag:
        ckpt_dir = paths.checkpoints_dir(run.out_dir)
        moved = adapters.check_resume(paths.saved_info(ckpt_dir, tag).get("adapter"), adapter, ckpt_dir / tag)
        if moved:
            run.notes.append(moved)


def plan_epochs(args: RunArgs, run: RunPlan, num_samples: int) -> None:
    """With --num_epochs, the run's length in steps, now that the training set's size is known:
    --max_steps and the JSON's "auto" scheduler counts are derived from it, and said."""
    if args.num_epochs is None:
        return
    steps = max(1, math.ceil(args.num_epochs * num_samples / run.batch.global_batch))
    config_path = ds_config.config_path(args.deepspeed_config, DEFAULT_DEEPSPEED_CONFIG)
    run.ds_cfg, _, run.filled = ds_config.resolve(config_path, run.env.world_size, steps, run.device,
                                                  run.out_dir / paths.MONITOR, overrides=args.ds)
    args.max_steps = steps
    run.notes.append(f"--num_epochs {args.num_epochs:g}: {num_samples:,} training samples at global batch "
                     f"{run.batch.global_batch} make {steps} steps (--max_steps {steps})")
    keep_saved_schedule(args, run)


def make_batches(args: RunArgs, run: RunPlan, train_samples: Samples, val_samples: Samples, what: str) -> Batches:
    """The global batch order over the training samples, and this rank's validation micro-batches
    (and, with --num_epochs, the run's length)."""
    plan_epochs(args, run, len(train_samples))
    plan = run.batch
    order = GlobalBatchOrder(len(train_samples), plan, args.seed)
    val_batches = eval_micro_batches(len(val_samples), args.eval_batches * plan.global_batch,
                                     plan.micro_batch, plan.data_rank(run.env.rank), plan.world_size)
    if not val_batches:
        raise UserError(f"the validation set of {what} holds fewer samples than there are data-parallel ranks "
                        f"({plan.world_size})")
    if plan.sp > 1:  # each rank of a group trains on its part of every sequence, and evaluates whole ones
        return Batches(sequence_tensor.SequenceShards(train_samples, plan.sp, run.env.rank % plan.sp), order,
                       sequence_tensor.WholeSequences(val_samples), val_batches)
    return Batches(train_samples, order, val_samples, val_batches)


def make_mixture_batches(args: RunArgs, run: RunPlan, train: mixture.SourceIndex, val: mixture.SourceIndex,
                         weights: list[float], unit: str = "samples") -> Batches:
    """A weighted mixture's global batch order, and each source's validation micro-batches."""
    if args.num_epochs is not None:
        raise UserError("--num_epochs counts passes over one training set; a weighted mixture passes over each "
                        "source at its own rate: give --max_steps")
    plan = run.batch

    def new_epoch(name: str, epoch: int, step: int) -> None:
        run.say(f"step {step:>6d} | source {name}: every one of its {unit} seen; epoch {epoch + 1} of it starts, "
                "re-permuted")

    order = mixture.MixtureOrder(train, weights, plan, args.seed, on_new_epoch=new_epoch)
    val_batches = mixture.val_micro_batches(val, args.eval_batches * plan.global_batch, plan.micro_batch,
                                            plan.data_rank(run.env.rank), plan.world_size)
    if len(val_batches) == 0:
        raise UserError(f"the sources' validation sets hold fewer {unit} than there are data-parallel ranks "
                        f"({plan.world_size})")
    run.say("Mixture: " + ", ".join(f"{name} {w:.1%} ({size:,} {unit})"
                                    for name, w, size in zip(train.names, weights, train.sizes)))
    return Batches(train, order, val, val_batches)


def build(args: RunArgs, run: RunPlan, job: Job, stage: int, pipe: pipeline.PipelinePlan | None) -> torch.nn.Module:
    """The recipe's model, with activation checkpointing if asked, or this rank's stage of it as a
    pipeline; says what was built."""
    model = job.build_model()
    if pipe is not None:  # this rank keeps its stage's layers; the rest of the model is dropped
        model = pipeline.to_pipeline(model, pipe)
        run.say(f"Model: {job.model_config.model_type}, seq_len {job.seq_len}; {ds_config.precision(run.ds_cfg)}, "
                f"ZeRO-{stage}; global batch {run.batch.global_batch} = {run.batch.micro_batch} micro x "
                f"{run.batch.grad_accum} micro-batches in flight x {run.batch.world_size} data-parallel pipelines")
        run.say(pipeline.describe(model))
        return model
    built_mb = None
    if stage == 3:  # each rank holds only its partitions: the model is never whole on one rank
        built_mb = distributed.rank_max(tensor_memory_mb(run.device), distributed.device(run.device, run.env))
        job.record["built_mb"] = built_mb
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    run.say(f"Model: {count_parameters(model) / 1e6:.2f}M parameters ({job.model_config.model_type}); seq_len "
            f"{job.seq_len}; {ds_config.precision(run.ds_cfg)}, ZeRO-{stage}; global batch {run.batch.global_batch} = "
            f"{run.batch.micro_batch} micro x {run.batch.grad_accum} accumulation x {run.batch.world_size} "
            + ("ranks" if run.batch.sp * run.batch.tp == 1 else "data-parallel ranks"))
    layout = sequence_tensor.describe(run.batch)
    if layout:
        run.say(layout)
    if job.adapter is not None:
        trainable = adapters.trainable_parameters(model)
        job.record["adapter"] = job.adapter.record(trainable)
        lora = job.adapter.config
        run.say(f"LoRA: r {lora.r}, alpha {lora.lora_alpha:g}, dropout {lora.lora_dropout:g} on "
                f"{', '.join(job.adapter.targets)}: {trainable / 1e6:.3f}M trainable parameters "
                f"({trainable / count_parameters(model):.2%}); the base is frozen"
                + (" and stays partitioned" if stage == 3 else ""))
    if built_mb is not None:
        run.say(f"ZeRO-3: built partitioned, {built_mb:.0f} MiB of tensors on the fullest rank (the whole model is "
                f"{count_parameters(model) * 4 / 2**20:.0f} MiB in fp32)")
    return model


def make_train_step(args: RunArgs, run: RunPlan, job: Job, engine, batches: Batches, stage: int) -> TrainStep:
    """The loop's step: the pipeline engine's, or forward/backward/step with the recipe's loss."""
    if job.make_step is not None:
        return job.make_step(engine, batches, stage)
    if pipeline.is_pipeline(engine.module):
        job.record["fused_loss"] = False
        return pipeline.PipelineStep(batches, run.batch, run.env.rank)
    loss_fn = build_loss(args, run, job, engine.module, stage) if job.make_loss is None else job.make_loss(
        engine.module, stage)
    return DataParallelStep(batches, run.batch, run.env, loss_fn)


def build_loss(args: RunArgs, run: RunPlan, job: Job, model: PreTrainedModel, stage: int) -> CausalLMLoss:
    """The training loss, fused with the output layer unless asked not to or it cannot be; says which."""
    why_not = fused_unavailable(model, stage) if args.fused_loss else "--no-fused_loss"
    if why_not is None and run.batch.tp > 1:
        why_not = "tensor parallelism: DeepSpeed's AutoTP owns the output layer"
    loss_fn = CausalLMLoss(model, fused=why_not is None)
    run.say("Loss: output layer and cross-entropy fused, in chunks of rows (the logits are never held whole)"
            if loss_fn.fused else f"Loss: cross-entropy over the model's logits ({why_not})")
    job.record["fused_loss"] = loss_fn.fused
    return loss_fn


def throughput_basis(args: RunArgs, run: RunPlan, job: Job) -> tuple[float, float | None, str]:
    """(model FLOPs per token, this rank's peak TFLOP/s or None, where the peak came from)."""
    flops_per_token = flops.flops_shape(job.model_config).per_token(job.seq_len)
    peak, source = flops.peak_tflops(run.device, ds_config.precision(run.ds_cfg), args.peak_tflops)
    if peak is not None and run.device == "cpu" and not args.peak_tflops:  # ranks' probes differ a little
        peak = distributed.all_reduce(torch.tensor(peak, dtype=torch.float64)).item() / run.env.world_size
    run.say(f"FLOPs: {flops_per_token / 1e9:.3f} GFLOP per token (6 x matmul parameters + attention, forward and "
            "backward); " + (f"MFU in the lines below is against {peak:.3g} TFLOP/s per rank, {source}"
                             + ("; a CPU's peak depends on its matrix units (AMX, AVX-512 BF16), so MFU is comparable "
                                "only between runs on one machine" if run.device == "cpu" else "")
                             if peak else f"no MFU: {source}"))
    job.record.update(flops_per_token=flops_per_token, peak_tflops_per_rank=peak, peak_source=source,
                      device=flops.device_name(run.device))
    return flops_per_token, peak, source


def downstream_eval(args: RunArgs, run: RunPlan, job: Job) -> Callable[[Any], dict[str, float]] | None:
    """The harness on the live model, as the loop calls it after each validation pass.

    Every rank runs the same requests in the same order: under ZeRO-3 each forward pass
    gathers the layers collectively from their partitions, so no rank ever holds a second
    whole copy of the model, and nothing is written to disk."""
    if not run.eval_tasks:
        return None
    chat = bool(getattr(job.tokenizer, "chat_template", None))

    def run_tasks(engine) -> dict[str, float]:
        start = time.perf_counter()
        engine.eval()
        try:
            lm = evaluation.language_model(engine.module, job.tokenizer, batch_size=run.batch.micro_batch)
            results = evaluation.evaluate(lm, run.eval_tasks, args.eval_limit, chat)
        finally:
            engine.train()
        # Every rank ran the same requests; the harness hands the results to local rank 0 alone.
        scores = distributed.from_main(evaluation.scores(results) if results is not None else None)
        return {**{f"eval/{name}": value for name, value in scores.items()}, "eval_tasks_s": time.perf_counter() - start}

    return run_tasks


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


def check_resume_matches(run: RunPlan, job: Job) -> None:
    """Before any rank starts: the checkpoint to resume was trained with this run's model, tokenizer,
    data, global batch and sequence length. One line names what differs."""
    tag = run.output.resume_tag
    if not tag:
        return
    tag_dir = paths.checkpoints_dir(run.out_dir) / tag
    paths.check_intact(tag_dir, "point {ckpt_dir}/latest at it (echo {tag} > {ckpt_dir}/latest), then continue "
                                "with: " + resume_command().replace("{", "{{").replace("}", "}}"))
    saved = paths.saved_info(tag_dir.parent, tag)
    where = f"--resume: checkpoint {tag_dir} was trained with"
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
    if "world_size" in saved and "zero_stage" in saved:  # a layout no conversion can bridge is refused now
        paths.layout_change(saved, run.env.world_size, ds_config.zero_stage(run.ds_cfg), run.batch.sp, run.batch.tp,
                            run.batch.pp)


def execute(args: RunArgs, run: RunPlan, job: Job, batches: Batches) -> TrainState:
    env, say = run.env, run.say
    check_resume_matches(run, job)
    sequence_tensor.check(run.batch, job.model_config, job.seq_len, lora=job.adapter is not None,
                   objective=job.name.upper() if job.make_loss or job.make_step else None)
    pipe = pipeline.plan_of(run.ds_cfg, run.batch.pp)
    pipeline.check(pipe, job.model_config, job.name, lora=job.adapter is not None, compiled=run.compile is not None)
    why_not_shm = distributed.init(env, args.shm_comm)
    if run.device == "cpu" and env.world_size > 1:
        say("Collectives: " + ("all-reduce, all-gather and reduce-scatter through DeepSpeed's shared-memory kernel"
                               if why_not_shm is None else f"gloo ({why_not_shm})"))
    job.record["shm_comm"] = why_not_shm is None
    distributed.barrier()  # every rank has checked the output folder before rank 0 writes to it
    distributed.seed_everything(args.seed)
    mpu = sequence_tensor.start_sequence_parallel(job.model_config, run.batch) if run.batch.sp > 1 else None

    stage = ds_config.zero_stage(run.ds_cfg)
    model = build(args, run, job, stage, pipe)
    for key, value in run.filled.items():
        say(f"DeepSpeed config: filled {key} = {value} (was \"auto\")")
    for note in run.notes:
        say(note)
    ckpt_dir = paths.checkpoints_dir(run.out_dir)
    resume_tag = run.output.resume_tag
    if resume_tag:
        change = paths.layout_change(paths.saved_info(ckpt_dir, resume_tag), env.world_size, stage,
                                     run.batch.sp, run.batch.tp, run.batch.pp)
        if change:
            # Another number of ranks or ZeRO stage: go through DeepSpeed's universal checkpoint,
            # which keeps the optimizer state. load_universal is derived here, not set in the JSON.
            say(f"Resuming across a layout change ({change}): converting the checkpoint to DeepSpeed's "
                "universal format")
            resume_tag = saving.convert_to_universal(ckpt_dir, resume_tag, env.rank, stage)
            run.ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    if run.output.replace and env.is_main:  # every check has passed: only now does the old run go
        say(f"--overwrite: removed the previous run's {', '.join(remove_previous_run(run.out_dir))} "
            f"from {run.out_dir}")
    distributed.barrier()
    # Only what trains reaches the optimizer (with LoRA, the adapters; the base stays frozen).
    trainable = [p for p in model.parameters() if p.requires_grad]
    tracking = "wandb" in ds_config.enabled_monitors(run.ds_cfg)
    if tracking:  # no account needed: the run is written to OUTPUT_DIR/wandb; `wandb sync` uploads it later
        run.out_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run.out_dir))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=run.ds_cfg, mpu=mpu)
    engine_setup.check_runs_as_planned(engine, run.ds_cfg, run.batch)
    engine_setup.lighten_step(engine, env.world_size, stage)
    if run.compile is not None:
        run.compile.prepare(engine.module, stage)
        engine.compile(backend=run.compile.backend, compile_kwargs=run.compile.kwargs())
        say(run.compile.describe())
        job.record["compile"] = {"backend": run.compile.backend, "mode": run.compile.mode,
                                 "deepcompile": run.compile.deepcompile}
    if job.adapter is not None:
        adapters.leave_base_out_of_checkpoints(engine)
        base_digest = adapters.frozen_digest(engine.module)
    train_step = make_train_step(args, run, job, engine, batches, stage)

    flops_per_token, peak, _ = throughput_basis(args, run, job)
    state = TrainState()
    if resume_tag:
        saved = saving.load(engine, ckpt_dir, resume_tag, env.rank, frozen_base=job.adapter is not None)
        state = TrainState(step=saved["step"], tokens=saved["tokens"])
        engine_setup.replay_adam_step_products(engine)
        say(f"Resumed from step {state.step} ({state.tokens:,} tokens seen)")
    if env.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        resolved = {
            "recipe": job.name, "args": asdict(args), "seq_len": job.seq_len, "world_size": env.world_size,
            "batch": {"micro_batch": run.batch.micro_batch, "grad_accum": run.batch.grad_accum,
                      "global_batch": run.batch.global_batch, "data_parallel": run.batch.world_size,
                      "sequence_parallel": run.batch.sp, "tensor_parallel": run.batch.tp,
                      "pipeline_stages": run.batch.pp},
            "deepspeed": run.ds_cfg, "filled_auto": run.filled, "deepspeed_overrides": run.overrides,
            "model": job.model_config.to_dict(),
            "parameters": count_parameters(model), **job.record,
        }
        write_run_config(run.out_dir, resolved)
        if tracking:
            import wandb

            if wandb.run is not None:  # DeepSpeed's monitor started it on this rank
                wandb.config.update(resolved, allow_val_change=True)
                log_wandb_by_step(engine.monitor)
    metrics = MetricsLog(run.out_dir, env.is_main, resume_step=state.step if resume_tag else None,
                         monitor=engine.monitor)
    if job.before_training is not None:
        job.before_training(engine, state.step)

    loop = LoopSettings(max_steps=args.max_steps, seq_len=job.seq_len, log_interval=args.log_interval,
                      eval_interval=args.eval_interval, save_interval=args.save_interval, out_dir=run.out_dir,
                      device_type=run.device, flops_per_token=flops_per_token, peak_tflops=peak,
                      global_batch=run.batch.global_batch, profile_step=args.profile_step,
                      downstream=downstream_eval(args, run, job))
    trainer_extra = {"global_batch": run.batch.global_batch, "seq_len": job.seq_len, "seed": args.seed}
    training_info = {"recipe": job.name, "precision": ds_config.precision(run.ds_cfg), "zero_stage": stage,
                     "tokenizer_digest": vocabulary_digest(job.tokenizer), "data_fingerprint": job.data_fingerprint,
                     "world_size": env.world_size, "sequence_parallel": run.batch.sp, "tensor_parallel": run.batch.tp,
                     "pipeline_stages": run.batch.pp,
                     "schedule": {k: v for k, v in run.filled.items() if k.startswith("scheduler.")}}
    hf_files = [job.model_config, job.tokenizer]
    if run.batch.pp > 1:  # which Hugging Face module each of the pipeline's layer files holds
        hf_files.append(pipeline.LayerNames(engine.module.hf_names))
    if job.adapter is not None:  # the checkpoint holds the adapters alone, and says which base they need
        training_info["adapter"] = job.record["adapter"]
        hf_files.append(job.adapter.config)

    def save(s: TrainState) -> Path:
        return saving.save(engine, run.out_dir, s.as_dict(**trainer_extra), env.rank, hf_files, training_info,
                               adapters.trainable_parameters(model), args.keep_last, log=say,
                               frozen_base=job.adapter is not None)

    train(engine, batches, run.batch, env, loop, state, metrics, train_step, save)
    if job.adapter is not None:
        changed = torch.tensor(float(adapters.frozen_digest(engine.module) != base_digest))
        unchanged = distributed.all_reduce(changed.to(engine.device)).item() == 0
        metrics.write({"step": state.step, "base_unchanged": unchanged})
        say("The frozen base weights are bit for bit what they were before training, on every rank" if unchanged
            else "WARNING: the frozen base weights changed during training; please report this")

    adapter_dir = getattr(args, "export_adapter", None)
    if args.export_hf or adapter_dir:
        record = export_after_training(engine, run.out_dir, job.model_config, job.tokenizer.eos_token_id, stage,
                                       env.is_main, force=args.overwrite,
                                       export_dir=Path(args.export_hf) if args.export_hf else None,
                                       adapter_dir=Path(adapter_dir) if adapter_dir else None, log=say)
        metrics.write({"step": state.step, **(record or {})})
        distributed.barrier()
    say(f"Done: {state.step} steps, {state.tokens:,} tokens; outputs in {run.out_dir}")
    return state
