"""What every recipe does once it knows its model, data and objective: check, start ranks, train, save, export.

A recipe checks its own inputs (data, tokenizer, model) and hands over a Job; `plan_run`
checks the shared ones (DeepSpeed JSON, output folders) before any rank starts, and `execute`
runs the rest of the story on every rank as named phases. Each phase returns what it learns;
the run's record gathers it and is written once, to OUTPUT_DIR/config.json. The objective
(train/objective.py), the layout (parallel/layout.py) and the trained weights
(models/adapters.py) are parts this module asks, never names.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
from transformers import PretrainedConfig, PreTrainedModel

from gpt_recipes import ds_config
from gpt_recipes.args import DEFAULT_DEEPSPEED_CONFIG, RunArgs
from gpt_recipes.checkpoints import paths, resume, saving
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
from gpt_recipes.data.samples import Samples
from gpt_recipes.data.tokenizer import vocabulary_digest
from gpt_recipes.data.tokens import GlobalBatchOrder, eval_micro_batches
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import Finished, UserError, first_line
from gpt_recipes.metrics import evaluation, flops
from gpt_recipes.metrics.log import MetricsLog, log_wandb_by_step
from gpt_recipes.metrics.memory import tensor_memory_mb
from gpt_recipes.models.adapters import TrainedWeights, trainable_parameters
from gpt_recipes.models.causal_lm import count_parameters, enable_activation_checkpointing
from gpt_recipes.models.compile import CompilePlan, plan_compile
from gpt_recipes.parallel import distributed, launchers, op_builds, shm_comm
from gpt_recipes.parallel.distributed import DistEnv
from gpt_recipes.parallel.layout import Layout, Uses
from gpt_recipes.train import engine_setup
from gpt_recipes.train.loop import Batches, LoopSettings, TrainState, train
from gpt_recipes.train.objective import Objective, StepSetup


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
    max_steps: int = 0  # set by set_length, from --max_steps or --num_epochs
    notes: list[str] = field(default_factory=list)  # said once the ranks have started
    eval_tasks: list[Any] = field(default_factory=list)  # lm-evaluation-harness tasks, resolved
    compile: CompilePlan | None = None  # how the model is compiled (None: eagerly)
    lock: RunLock | None = None  # rank 0's lock on the output folder
    overrides: list[str] = field(default_factory=list)  # --ds values applied to the JSON

    @property
    def layout(self) -> Layout:
        return self.batch.layout

    def say(self, *text: Any) -> None:
        if self.env.is_main:
            print(*text, flush=True)

    def set_length(self, steps: int) -> None:
        """The run's length in optimizer steps: the JSON's "auto" scheduler counts follow from it, and a
        resumed run keeps the ones it was planned with (and says so)."""
        self.max_steps = steps
        self.filled.update(ds_config.fill_schedule(self.ds_cfg, steps))
        if not self.output.resume_tag:
            return
        saved = paths.saved_info(paths.checkpoints_dir(self.out_dir), self.output.resume_tag)
        for key, (kept, fresh) in ds_config.keep_saved_schedule(self.ds_cfg, self.filled,
                                                                saved.get("schedule", {})).items():
            self.notes.append(
                f"Resuming keeps the schedule the run was planned with: {key} = {kept} (--max_steps {steps} would "
                f"make it {fresh}). Past step {kept}, a warm-up/decay schedule stays at its final learning rate; to "
                "plan another, give the scheduler's step counts as numbers in the DeepSpeed JSON")


@dataclass
class Job:
    """The recipe-specific parts: its objective, how to build the model, what the data was."""

    recipe: str
    objective: Objective
    model_config: PretrainedConfig
    tokenizer: Any
    seq_len: int
    build_model: Callable[[], PreTrainedModel]
    data: dict[str, Any] = field(default_factory=dict)  # what the training data was, for OUT/config.json
    # What the training samples were made from (a prepared folder's fingerprint, a digest of the
    # rows): a resume must continue on the same data.
    data_fingerprint: str | None = None
    # What trains: every weight, or adapters that build_model adds to a frozen base.
    weights: TrainedWeights = field(default_factory=TrainedWeights)


# Flags that name what a run reads: no output may be one of them, lie inside one or hold one.
INPUT_FLAGS = ("data", "val_data", "model", "model_name_or_path")


def plan_run(args: RunArgs) -> RunPlan:
    """Check the DeepSpeed JSON and output folders every recipe shares (the flags' ranges were checked
    when they were parsed)."""
    env = distributed.environment()
    device = distributed.device_type()
    out_dir = Path(args.output_dir)
    config_path = ds_config.config_path(args.deepspeed_config, DEFAULT_DEEPSPEED_CONFIG)
    ds_cfg, batch, filled = ds_config.resolve(config_path, env.world_size, None, device, out_dir / paths.MONITOR,
                                              overrides=args.ds)
    overridden = ds_config.apply_overrides(ds_config.load_config(config_path), args.ds)
    inputs = input_paths(args, config_path)
    check_output_path(out_dir, "--output_dir", inputs)
    output = plan_output_dir(out_dir, args.resume, args.overwrite, args.resume_from)
    # Taken now, before data and model load: a second run into a live folder is refused at once.
    lock = RunLock(out_dir) if env.is_main else None  # held for the life of the process
    if lock is not None and plan_output_dir(out_dir, args.resume, args.overwrite, args.resume_from) != output:
        raise UserError(f"--output_dir {out_dir} changed while this run was starting (another run ended there?); "
                        "start it again")
    check_not_finished(args, out_dir, output)
    op_builds.check_op_builds()
    if args.export_hf:
        check_output_path(args.export_hf, "--export_hf", inputs, outputs={"--output_dir": out_dir})
        check_output_folder(Path(args.export_hf), args.overwrite, force_flag="--overwrite")
    eval_tasks = evaluation.resolve_tasks([t for name in args.eval_tasks for t in name.split(",") if t]) \
        if args.eval_tasks else []
    run = RunPlan(env, device, ds_cfg, batch, filled, out_dir, output, eval_tasks=eval_tasks, lock=lock,
                  compile=plan_compile(args, ds_cfg, device), overrides=list(args.ds))
    run.notes += [output.note] if output.note else []
    run.notes += [f"DeepSpeed config: --ds {key} = {json.dumps(now)} for this run (the JSON has "
                  f"{json.dumps(before) if before != '(not set)' else 'no value'})" for key, (before, now) in overridden.items()]
    if args.num_epochs is None:  # else once the training set's size gives the run's length
        run.set_length(args.max_steps)
    return run


def check_not_finished(args: RunArgs, out_dir: Path, output) -> None:
    """--resume of a run whose latest checkpoint is its last step (a requeued or restarted job that
    had finished) has nothing to do: it says so and exits 0 before any rank starts."""
    if not args.resume or output.resume_tag is None or args.num_epochs is not None:
        return
    step = paths.saved_info(paths.checkpoints_dir(out_dir), output.resume_tag).get("step", 0)
    if step >= args.max_steps:
        raise Finished(f"{out_dir} holds a finished run: its latest checkpoint, {output.resume_tag}, is step {step} "
                       f"of --max_steps {args.max_steps}; nothing to resume (raise --max_steps to train further)")


def input_paths(args: RunArgs, config_path: str) -> dict[str, list[str]]:
    """{flag: the existing paths it names} for the run's inputs (a preset name is no path)."""
    found: dict[str, list[str]] = {"--deepspeed_config": [config_path]}
    for name in INPUT_FLAGS:
        value = vars(args).get(name)
        paths_named = [v for v in (value if isinstance(value, list) else [value]) if v and Path(v).exists()]
        if paths_named:
            found[f"--{name}"] = paths_named
    return found


def plan_epochs(args: RunArgs, run: RunPlan, num_samples: int) -> None:
    """With --num_epochs, the run's length in steps, now that the training set's size is known (said)."""
    if args.num_epochs is None:
        return
    steps = max(1, math.ceil(args.num_epochs * num_samples / run.batch.global_batch))
    run.notes.append(f"--num_epochs {args.num_epochs:g}: {num_samples:,} training samples at global batch "
                     f"{run.batch.global_batch} make {steps} steps (--max_steps {steps})")
    run.set_length(steps)


def make_batches(args: RunArgs, run: RunPlan, train_samples: Samples, val_samples: Samples, what: str,
                 per_step: int | None = None) -> Batches:
    """The global batch order over the training samples, this rank's validation micro-batches (and,
    with --num_epochs, the run's length). `per_step`: samples a step takes, when not the global batch
    (GRPO's prompts, each completed several times)."""
    plan = run.batch
    per_step = per_step or plan.global_batch
    plan_epochs(args, run, len(train_samples) * plan.global_batch // per_step)
    step_plan = plan if per_step == plan.global_batch else BatchPlan(micro_batch=per_step, grad_accum=1, world_size=1)
    order = GlobalBatchOrder(len(train_samples), step_plan, args.seed)
    val_batches = eval_micro_batches(len(val_samples), args.eval_batches * per_step, plan.micro_batch,
                                     plan.data_rank(run.env.rank), plan.world_size)
    if not val_batches:
        raise UserError(f"the validation set of {what} holds fewer samples than there are data-parallel ranks "
                        f"({plan.world_size})")
    train_samples, val_samples = run.layout.shard_samples(train_samples, val_samples, run.env.rank)
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
                                    for name, w, size in zip(train.source_names, weights, train.sizes)))
    train, val = run.layout.shard_samples(train, val, run.env.rank)
    return Batches(train, order, val, val_batches)


# --- The phases of a run, in the order execute() calls them ---------------------------------------


def check_job(args: RunArgs, run: RunPlan, job: Job) -> None:
    """Before any rank starts: a resume continues what it should, and the layout can run this job."""
    run.notes += resume.check_matches(run, job)
    uses = Uses(adapters=job.weights.frozen_base, compiled=run.compile is not None,
                downstream_eval=bool(run.eval_tasks), activation_checkpointing=args.activation_checkpointing)
    refused = run.layout.refusal(job.model_config, job.seq_len, job.objective.supports, job.objective.title, uses)
    if refused:
        raise UserError(refused)


def start_ranks(args: RunArgs, run: RunPlan) -> dict[str, Any]:
    """Join the process group (shared-memory collectives on CPU ranks where they work) and seed."""
    found = launchers.detect()  # before init, which exports torch's variables for srun's and mpirun's ranks
    why_not_shm = distributed.init(run.env, args.shm_comm)
    if run.env.world_size > 1:
        run.say(found.describe())
    if run.device == "cpu" and run.env.world_size > 1:
        run.say("Collectives: " + ("all-reduce, all-gather and reduce-scatter of the engine's data-parallel group "
                                   "through DeepSpeed's shared-memory kernel; other groups through gloo"
                                   if why_not_shm is None else f"gloo ({why_not_shm})"))
    distributed.barrier()  # every rank has checked the output folder before rank 0 writes to it
    distributed.seed_everything(args.seed)
    return {"shm_comm": why_not_shm is None}


def build(args: RunArgs, run: RunPlan, job: Job) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The recipe's model, placed as the layout asks (some layouts keep a part of it on each rank), with
    activation checkpointing if asked; says what was built and returns the facts."""
    model = job.build_model()
    stage, facts = run.layout.zero_stage, {"parameters": count_parameters(model)}
    if stage == 3:  # each rank holds only its partitions: the model is never whole on one rank
        facts["built_mb"] = distributed.rank_max(tensor_memory_mb(run.device), distributed.device(run.device, run.env))
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    weights_line, weights_facts = job.weights.describe(model, stage)
    run.say(f"Model: {facts['parameters'] / 1e6:.2f}M parameters ({job.model_config.model_type}); seq_len "
            f"{job.seq_len}; {ds_config.precision(run.ds_cfg)}, ZeRO-{stage}; {run.batch.describe()}")
    model, placed = run.layout.place(model)
    for line in (placed, weights_line):
        if line:
            run.say(line)
    if "built_mb" in facts:
        run.say(f"ZeRO-3: built partitioned, {facts['built_mb']:.0f} MiB of tensors on the fullest rank (the whole "
                f"model is {facts['parameters'] * 4 / 2**20:.0f} MiB in fp32)")
    return model, {**facts, **weights_facts}


def resume_point(run: RunPlan) -> str | None:
    """The checkpoint tag to load: on another number of ranks or ZeRO stage, its conversion to
    DeepSpeed's universal checkpoint, which keeps the optimizer state."""
    tag = run.output.resume_tag
    if not tag:
        return None
    ckpt_dir = paths.checkpoints_dir(run.out_dir)
    change = run.layout.resume_change(Layout.from_record(paths.saved_info(ckpt_dir, tag)))
    if not change:
        return tag
    run.say(f"Resuming across a layout change ({change}): converting the checkpoint to DeepSpeed's universal format")
    run.ds_cfg.setdefault("checkpoint", {})["load_universal"] = True  # derived here, not set in the JSON
    return saving.convert_to_universal(ckpt_dir, tag, run.env.rank, run.layout.zero_stage)


def clear_previous_run(run: RunPlan) -> None:
    """Every check has passed: only now does an --overwrite'n run's output go."""
    if run.output.replace and run.env.is_main:
        run.say(f"--overwrite: removed the previous run's {', '.join(remove_previous_run(run.out_dir))} "
                f"from {run.out_dir}")
    distributed.barrier()


def start_engine(run: RunPlan, job: Job, model: torch.nn.Module, mpu) -> tuple[Any, dict[str, Any]]:
    """deepspeed.initialize over what trains (adapters on a frozen base: the adapters alone), checked
    against the plan."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if "wandb" in ds_config.enabled_monitors(run.ds_cfg):
        # No account needed: the run is written to OUTPUT_DIR/wandb; `wandb sync` uploads it later.
        run.out_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(run.out_dir))
    run.layout.prepare_engine()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=run.ds_cfg, mpu=mpu)
    shm_comm.carry_engine_group(engine)  # the one group the kernel may serve (parallel/shm_comm.py)
    engine_setup.check_runs_as_planned(engine, run.ds_cfg, run.batch)
    engine_setup.lighten_step(engine, run.env.world_size, run.layout.zero_stage)
    facts = {}
    if run.compile is not None:
        run.compile.prepare(engine.module, run.layout.zero_stage)
        engine.compile(backend=run.compile.backend, compile_kwargs=run.compile.kwargs())
        run.say(run.compile.describe())
        facts["compile"] = {"backend": run.compile.backend, "mode": run.compile.mode,
                            "deepcompile": run.compile.deepcompile}
    job.weights.prepare(engine)
    return engine, facts


def throughput_basis(args: RunArgs, run: RunPlan, job: Job) -> dict[str, Any]:
    """Model FLOPs per token and this rank's peak TFLOP/s (None: no MFU), and where the peak came from."""
    flops_per_token = flops.flops_shape(job.model_config).per_token(job.seq_len)
    peak, source = flops.peak_tflops(run.device, ds_config.precision(run.ds_cfg), args.peak_tflops)
    if peak is not None and run.device == "cpu" and not args.peak_tflops:  # ranks' probes differ a little
        peak = distributed.all_reduce(torch.tensor(peak, dtype=torch.float64)).item() / run.env.world_size
    run.say(f"FLOPs: {flops_per_token / 1e9:.3f} GFLOP per token (6 x matmul parameters + attention, forward and "
            "backward); " + (f"MFU in the lines below is against {peak:.3g} TFLOP/s per rank, {source}"
                             + ("; a CPU's peak depends on its matrix units (AMX, AVX-512 BF16), so MFU is comparable "
                                "only between runs on one machine" if run.device == "cpu" else "")
                             if peak else f"no MFU: {source}"))
    return {"flops_per_token": flops_per_token, "peak_tflops_per_rank": peak, "peak_source": source,
            "device": flops.device_name(run.device)}


def load_resumed(engine, run: RunPlan, job: Job, tag: str | None) -> TrainState:
    """The checkpoint's weights, optimizer state, RNG states and position; a fresh state without one."""
    if not tag:
        return TrainState()
    ckpt_dir = paths.checkpoints_dir(run.out_dir)
    try:
        saved = saving.load(engine, ckpt_dir, tag, run.env.rank, frozen_base=job.weights.frozen_base)
    except BaseException as err:
        if tag == run.output.resume_tag:
            raise
        # A conversion made for this resume that DeepSpeed cannot load is not left behind.
        if run.env.is_main:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        if isinstance(err, (AssertionError, TypeError, ValueError)):
            raise UserError(f"DeepSpeed could not load {run.output.resume_tag} converted for this layout "
                            f"({first_line(err)}); resume on the layout it was written on") from err
        raise
    engine_setup.replay_adam_step_products(engine)
    run.say(f"Resumed from step {saved['step']} ({saved['tokens']:,} tokens seen)")
    return TrainState(step=saved["step"], tokens=saved["tokens"])


@dataclass
class RunRecord:
    """What the run is and learned: OUTPUT_DIR/config.json, written once by rank 0, and the part of it
    each checkpoint's training.json repeats."""

    config: dict[str, Any]  # all of it
    checkpoint: dict[str, Any]  # the facts a checkpoint needs to be resumed, converted and exported alone

    @classmethod
    def gather(cls, args: RunArgs, run: RunPlan, job: Job, facts: dict[str, Any]) -> "RunRecord":
        objective = {"objective": job.objective.name, **job.objective.config_record()}
        checkpoint = {"recipe": job.recipe, **objective, "precision": ds_config.precision(run.ds_cfg),
                      **run.layout.record(), "tokenizer_digest": vocabulary_digest(job.tokenizer),
                      "data_fingerprint": job.data_fingerprint,
                      "schedule": {k: v for k, v in run.filled.items() if k.startswith("scheduler.")},
                      **({"adapter": facts["adapter"]} if "adapter" in facts else {})}
        batch = run.batch
        config = {"recipe": job.recipe, **objective, "args": asdict(args), "max_steps": run.max_steps,
                  "seq_len": job.seq_len, "world_size": run.env.world_size,
                  "batch": {"micro_batch": batch.micro_batch, "grad_accum": batch.grad_accum,
                            "global_batch": batch.global_batch, "data_parallel": batch.world_size},
                  "layout": run.layout.record(),
                  "deepspeed": run.ds_cfg, "filled_auto": run.filled, "deepspeed_overrides": run.overrides,
                  "model": job.model_config.to_dict(), "data": job.data, **facts}
        return cls(config, checkpoint)

    def write(self, run: RunPlan, engine) -> None:
        if not run.env.is_main:
            return
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run.out_dir, self.config)
        if "wandb" in ds_config.enabled_monitors(run.ds_cfg):
            import wandb

            if wandb.run is not None:  # DeepSpeed's monitor started it on this rank
                wandb.config.update(self.config, allow_val_change=True)
                log_wandb_by_step(engine.monitor)


def loop_settings(args: RunArgs, run: RunPlan, job: Job, basis: dict[str, Any]) -> LoopSettings:
    return LoopSettings(max_steps=run.max_steps, log_interval=args.log_interval, eval_interval=args.eval_interval,
                        save_interval=args.save_interval, out_dir=run.out_dir, device_type=run.device,
                        flops_per_token=basis["flops_per_token"], peak_tflops=basis["peak_tflops_per_rank"],
                        profile_step=args.profile_step, downstream=downstream_eval(args, run, job))


def checkpoint_saver(args: RunArgs, run: RunPlan, job: Job, engine, record: RunRecord) -> Callable[[TrainState], Path]:
    hf_files = [job.model_config, job.tokenizer, *run.layout.checkpoint_files(engine.module),
                *job.weights.checkpoint_files()]
    trainer_extra = {"global_batch": run.batch.global_batch, "seq_len": job.seq_len, "seed": args.seed}

    def save(state: TrainState) -> Path:
        return saving.save(engine, run.out_dir, state.as_dict(job.objective.best.key, **trainer_extra), run.env.rank,
                           hf_files, record.checkpoint, trainable_parameters(engine.module), args.keep_last,
                           log=run.say, frozen_base=job.weights.frozen_base, best=job.objective.best)

    return save


def finish(args: RunArgs, run: RunPlan, job: Job, engine, state: TrainState, metrics: MetricsLog) -> None:
    """After the last step: what the trained weights check, the export (verified against the engine)."""
    line, figures = job.weights.finish(engine)
    if figures:
        metrics.write({"step": state.step, **figures})
    if line:
        run.say(line)
    adapter_dir = job.weights.export_dir
    if args.export_hf or adapter_dir:
        record = export_after_training(engine, run.out_dir, job.model_config, job.tokenizer.eos_token_id,
                                       run.layout.zero_stage, run.env.is_main, force=args.overwrite,
                                       export_dir=Path(args.export_hf) if args.export_hf else None,
                                       adapter_dir=adapter_dir, log=run.say)
        metrics.write({"step": state.step, **(record or {})})
        distributed.barrier()
    run.say(f"Done: {state.step} steps, {state.tokens:,} tokens; outputs in {run.out_dir}")


def execute(args: RunArgs, run: RunPlan, job: Job, batches: Batches) -> TrainState:
    check_job(args, run, job)
    facts = start_ranks(args, run)
    mpu = run.layout.start_groups(job.model_config, run.batch.micro_batch)
    model, built = build(args, run, job)
    for key, value in run.filled.items():
        run.say(f"DeepSpeed config: filled {key} = {value} (was \"auto\")")
    for note in run.notes:
        run.say(note)
    resume_tag = resume_point(run)
    clear_previous_run(run)
    engine, engine_facts = start_engine(run, job, model, mpu)
    step, step_facts = job.objective.make_step(StepSetup(engine, batches, run, run.layout.zero_stage, args.seed))
    basis = throughput_basis(args, run, job)
    state = load_resumed(engine, run, job, resume_tag)
    record = RunRecord.gather(args, run, job, {**facts, **built, **engine_facts, **step_facts, **basis})
    record.write(run, engine)
    metrics = MetricsLog(run.out_dir, run.env.is_main, resume_step=state.step if resume_tag else None,
                         monitor=engine.monitor)
    train(engine, batches, run.batch, run.env, loop_settings(args, run, job, basis), state, metrics, job.objective,
          step, checkpoint_saver(args, run, job, engine, record))
    finish(args, run, job, engine, state, metrics)
    return state


def downstream_eval(args: RunArgs, run: RunPlan, job: Job) -> Callable[[Any], dict[str, float]] | None:
    """The harness on the live model, as the loop calls it after each validation pass.

    Every rank runs the same requests in the same order: under ZeRO-3 each forward pass
    gathers the layers collectively from their partitions, so no rank ever holds a second
    whole copy of the model, and nothing is written to disk."""
    if not run.eval_tasks:
        return None
    chat = bool(job.tokenizer.chat_template)

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
