"""How a run's ranks share the work: one object, built once from the DeepSpeed JSON and the world size.

A layout has a data-parallel degree and at most one other: sequence (DeepSpeed Ulysses,
`"sequence_parallel_size"`), tensor (DeepSpeed AutoTP, `"tensor_parallel": {"autotp_size"}`)
or pipeline (`"pipeline": {"stages"}`); the ZeRO stage partitions over the data-parallel
ranks. The ranks of one sequence, tensor or pipeline group read the same samples;
`data_rank` says which part of each global batch a rank reads. Expert parallelism (DeepSpeed
AutoEP, `"expert_parallel": {"autoep_size"}`) splits each MoE layer's experts over ranks that
still read different samples: it combines with data parallelism only.

What combines with what is written here once, as two checks: `Layout.of_config` (the JSON
alone, on this many ranks) and `Layout.refusal` (against a model, a sequence length and an
objective). The runner raises what they say, `tools/plan_memory.py` leaves such JSONs out with
the same words, and `resume_change` says what resuming a checkpoint on another layout means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpt_recipes.errors import UserError

# DeepSpeed's pipeline partition methods these recipes cut by ("best" is its default, by parameters).
PARTITIONS = ("parameters", "uniform")
# AutoTP splits q/k/v/o and gate/up/down projections that are separate nn.Linear layers, as here;
# fused projections (GPT-NeoX's query_key_value) would need sub-parameter handling on export.
TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def zero_stage(cfg: dict[str, Any]) -> int:
    """The JSON's ZeRO stage, over the data-parallel ranks of the layout."""
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


# (saved ZeRO stage, this run's) a resume may bridge through DeepSpeed's universal checkpoint, as
# tested (tests/checkpoints/test_reliability.py): another number of ranks at one stage, and ZeRO-3 to
# ZeRO-2. DeepSpeed 0.19.8 fails others inside its loaders (ZeRO-2 to 3: an assertion in
# check_ckpt_list; ZeRO-2 to 0: a TypeError in the fp16/bf16 optimizer's load_state_dict).
UNIVERSAL_RESUMES = {(1, 1), (2, 2), (3, 3), (3, 2)}


@dataclass(frozen=True)
class Supports:
    """The layouts besides data parallelism (any ZeRO stage) that an objective can run on, and whether
    it compiles; `why_not` and `why_not_compiled` say why it cannot run the others."""

    sequence: bool = False
    tensor: bool = False
    pipeline: bool = False
    experts: bool = False  # trains mixture-of-experts models (with their router's load-balancing loss)
    why_not: str = ""
    compiled: bool = True
    why_not_compiled: str = ""

    def allows(self, mode: str) -> bool:
        return {"sequence": self.sequence, "tensor": self.tensor, "pipeline": self.pipeline}[mode]


EVERY_LAYOUT = Supports(sequence=True, tensor=True, pipeline=True, experts=True)


@dataclass(frozen=True)
class Uses:
    """What else a run does that a layout may not combine with."""

    adapters: bool = False  # LoRA adapters on a frozen base (--use_peft)
    compiled: bool = False  # torch.compile (--torch_compile, compile.deepcompile)
    downstream_eval: bool = False  # lm-evaluation-harness on the live model (--eval_tasks)
    activation_checkpointing: bool = False  # transformers' gradient checkpointing (--activation_checkpointing)


@dataclass(frozen=True)
class Layout:
    world: int = 1
    zero_stage: int = 0
    sequence: int = 1  # ranks that split each sample's sequence
    tensor: int = 1  # ranks that split each layer's projections
    pipeline: int = 1  # stages that split the layers
    expert: int = 1  # ranks that split each MoE layer's experts (DeepSpeed AutoEP, "expert_parallel")
    autoep: bool = False  # AutoEP replaces the MoE blocks (also at autoep_size 1): its parameter names differ
    partition: str = "parameters"  # a pipeline's partition method: parameters, uniform or type:REGEX
    activation_checkpoint_interval: int = 0  # a pipeline's, in layers

    @property
    def group(self) -> int:
        """Ranks that read the same samples."""
        return self.sequence * self.tensor * self.pipeline

    @property
    def data(self) -> int:
        """Data-parallel ranks: the parts each global batch is split into."""
        return self.world // self.group

    @property
    def averages_over_sequence(self) -> bool:
        # DeepSpeed 0.19 sums gradients over a sequence-parallel group and averages over data-parallel
        # ranks, except at ZeRO-3, whose reduce-scatter averages over every rank.
        return self.sequence > 1 and self.zero_stage == 3

    def data_rank(self, rank: int) -> int:
        """Which part of each global batch global rank `rank` reads. DeepSpeed numbers a pipeline's
        ranks stage-major (rank = stage x data-parallel size + data-parallel rank)."""
        if self.pipeline > 1:
            return rank % self.data
        return rank // (self.sequence * self.tensor)

    @property
    def mode(self) -> str | None:
        """The layout's degree besides data parallelism: "sequence", "tensor", "pipeline" or None."""
        return ("sequence" if self.sequence > 1 else "tensor" if self.tensor > 1
                else "pipeline" if self.pipeline > 1 else None)

    def what(self) -> str:
        """The layout's mode as the JSON asks for it, for messages."""
        return {"sequence": f"sequence parallelism (sequence_parallel_size {self.sequence})",
                "tensor": f"tensor parallelism (tensor_parallel.autotp_size {self.tensor})",
                "pipeline": f"a pipeline (pipeline.stages {self.pipeline})",
                None: "data parallelism"}[self.mode]

    def ranks_text(self) -> str:
        """What the data-parallel degree counts, as a global batch's description names it."""
        return {None: "ranks", "pipeline": "data-parallel pipelines"}.get(self.mode, "data-parallel ranks")

    def describe(self) -> str | None:
        """A line saying how the ranks share the work, for layouts other than data parallelism."""
        if self.mode == "sequence":
            return (f"Sequence parallel: {self.sequence} ranks split each sequence (DeepSpeed Ulysses all-to-all in "
                    f"attention); {self.data} data-parallel group(s)")
        if self.mode == "tensor":
            return (f"Tensor parallel: {self.tensor} ranks split each layer's projections (DeepSpeed AutoTP); "
                    f"{self.data} data-parallel group(s)")
        if self.expert > 1:
            return (f"Expert parallel: {self.expert} ranks split each MoE layer's experts (DeepSpeed AutoEP, tokens "
                    f"exchanged all-to-all); the other weights are data-parallel over all {self.world} ranks")
        return None

    # --- What a layout does to the run's parts -------------------------------------------------------

    def shard_samples(self, train, val, rank: int):
        """(training samples as this rank trains on them, validation samples as it evaluates them):
        a sequence-parallel rank trains on its part of every sequence and evaluates whole ones."""
        if self.mode != "sequence":
            return train, val
        from gpt_recipes.parallel.sequence_tensor import SequenceShards, WholeSequences

        return SequenceShards(train, self.sequence, rank % self.sequence), WholeSequences(val)

    def start_groups(self, model_config, micro_batch: int):
        """Process groups the layout needs before the model is built (Ulysses' attention and groups):
        the `mpu` deepspeed.initialize takes, or None."""
        if self.mode != "sequence":
            return None
        from gpt_recipes.parallel.sequence_tensor import start_sequence_parallel

        return start_sequence_parallel(model_config, self.sequence, micro_batch)

    def place(self, model):
        """(the module the engine is given, a line saying how it was placed or None): a pipeline's
        stage of the model (the rest is dropped), else the model."""
        if self.mode != "pipeline":
            return model, self.describe()
        from gpt_recipes.parallel import pipeline

        module = pipeline.to_pipeline(model, self)
        return module, pipeline.describe(module)

    def prepare_engine(self) -> None:
        """What must hold before deepspeed.initialize builds this layout: AutoEP's registry adapter."""
        if self.autoep:
            from gpt_recipes.parallel.experts import adapt_output_recorder_registry

            adapt_output_recorder_registry()

    def checkpoint_files(self, module) -> list[Any]:
        """Objects with save_pretrained that each checkpoint holds for this layout: which Hugging Face
        module each of a pipeline's layer files holds."""
        if self.mode != "pipeline":
            return []
        from gpt_recipes.parallel.pipeline import LayerNames

        return [LayerNames(module.hf_names)]

    # --- Records: what a checkpoint and OUTPUT_DIR/config.json say of the layout ---------------------

    def record(self) -> dict[str, int]:
        return {"world_size": self.world, "zero_stage": self.zero_stage, "sequence_parallel": self.sequence,
                "tensor_parallel": self.tensor, "pipeline_stages": self.pipeline, "expert_parallel": self.expert,
                "autoep": self.autoep}

    @classmethod
    def from_record(cls, info: dict[str, Any]) -> "Layout":
        return cls(world=info["world_size"], zero_stage=info["zero_stage"],
                   sequence=info.get("sequence_parallel", 1), tensor=info.get("tensor_parallel", 1),
                   pipeline=info.get("pipeline_stages", 1), expert=info.get("expert_parallel", 1),
                   autoep=info.get("autoep", False))

    def short(self) -> str:
        experts = f", experts over {self.expert}" if self.expert > 1 else ""
        return f"{self.world} ranks at ZeRO-{self.zero_stage}{experts}"

    def resume_change(self, saved: "Layout") -> str | None:
        """What resuming a checkpoint written on `saved` means here: None (the same layout), a line
        naming the change (bridged by DeepSpeed's universal checkpoint), or a UserError.

        Sequence-, tensor- and pipeline-parallel checkpoints resume on the same layout only: DeepSpeed's
        universal checkpoints do not regroup AutoTP shards or pipeline layer files, and these recipes
        do not test regrouping Ulysses runs."""
        if (saved.pipeline > 1 or self.pipeline > 1) and (saved.world, saved.zero_stage, saved.pipeline) != (
                self.world, self.zero_stage, self.pipeline):
            raise UserError(f"the checkpoint was written by {saved.short()} with {saved.pipeline} pipeline stage(s); "
                            f"this run has {self.short()} with {self.pipeline}: resume a pipeline run with the same "
                            "ranks and DeepSpeed JSON (or export it with tools/convert_to_hf.py and start a new run "
                            "from the export)")
        split = (saved.sequence, saved.tensor) != (self.sequence, self.tensor) or (
            saved.sequence * saved.tensor > 1 and (saved.world, saved.zero_stage) != (self.world, self.zero_stage))
        if split:
            raise UserError(f"the checkpoint was written by {saved.short()}, sequence_parallel_size {saved.sequence}, "
                            f"tensor_parallel.autotp_size {saved.tensor}; this run has {self.short()}, {self.sequence} "
                            f"and {self.tensor}: resume a sequence- or tensor-parallel run with the same ranks and "
                            "DeepSpeed JSON")
        if saved.autoep != self.autoep:
            raise UserError("the checkpoint was written " + ("with" if saved.autoep else "without") + " DeepSpeed AutoEP "
                            "(\"expert_parallel\"), this run is " + ("not" if saved.autoep else "") + ", and the two "
                            "name the experts' weights differently: resume with a JSON that "
                            + ("enables expert_parallel (autoep_size 1 on one rank)" if saved.autoep else
                               "leaves expert_parallel off") + ", or export it with tools/convert_to_hf.py and start a "
                            "new run from the export")
        if (saved.world, saved.zero_stage, saved.expert) == (self.world, self.zero_stage, self.expert):
            return None
        if (saved.zero_stage, self.zero_stage) not in UNIVERSAL_RESUMES:
            raise UserError(f"the checkpoint was written at ZeRO-{saved.zero_stage}; resuming it at ZeRO-{self.zero_stage} "
                            "is not among the changes DeepSpeed's universal checkpoint carries out here (another number "
                            "of ranks at ZeRO-1, 2 or 3, and ZeRO-3 to 2): resume at ZeRO-"
                            f"{saved.zero_stage} (the JSON it was trained with), or export it with tools/convert_to_hf.py "
                            "and start a new run from the export")
        return f"{saved.short()} -> {self.short()}"

    # --- The rules -----------------------------------------------------------------------------------

    @classmethod
    def of_config(cls, cfg: dict[str, Any], world: int) -> "Layout":
        """The layout a DeepSpeed JSON asks for on `world` ranks; what cannot combine is a UserError."""
        stage = zero_stage(cfg)
        sp, tp, tp_block = _sequence_and_tensor(cfg)
        pp, partition, interval = _pipeline(cfg)
        expert = _expert(cfg)
        layout = cls(world, stage, sp, tp, pp, expert=expert or 1, autoep=expert > 0, partition=partition,
                     activation_checkpoint_interval=interval)
        problem = layout._config_problem(tp_block, cfg)
        if problem:
            raise UserError(f"DeepSpeed config: {problem}")
        return layout

    def _config_problem(self, tp_block: dict[str, Any], cfg: dict[str, Any]) -> str | None:
        sp, tp, pp = self.sequence, self.tensor, self.pipeline
        if problem := _expert_problem(self, cfg.get("expert_parallel") or {}):
            return problem
        if pp > 1 and sp * tp > 1:
            return ("pipeline.stages and " + ("sequence_parallel_size" if sp > 1 else "tensor_parallel.autotp_size")
                    + " are both above 1; these recipes combine a pipeline with data parallelism only")
        if pp > 1 and self.zero_stage >= 2:
            return (f"a pipeline (pipeline.stages {pp}) runs with ZeRO stage 0 or 1, not {self.zero_stage} (DeepSpeed's "
                    "pipeline engine partitions no gradients or parameters); use ds_configs/zero1_pp2.json or set "
                    "zero_optimization.stage to 1")
        if sp > 1 and tp > 1:
            return ("sequence_parallel_size and tensor_parallel.autotp_size are both above 1; these recipes run one "
                    "of them at a time")
        size, key = {"sequence": (sp, "sequence_parallel_size"), "tensor": (tp, "tensor_parallel.autotp_size"),
                     "pipeline": (pp, "pipeline.stages"), None: (1, "")}[self.mode]
        if self.world % size:
            return f"{key} {size} does not divide the {self.world} ranks; launch a multiple of {size} ranks"
        if tp > 1 and tp_block.get("vocab_parallel_lm_head") is not False:
            # DeepSpeed would split a tied output layer by vocabulary, and each rank would see a slice
            # of the logits; the loss, evaluation and export checks need them whole.
            return ("set tensor_parallel.vocab_parallel_lm_head to false; these recipes take the loss over "
                    "whole-vocabulary logits")
        if sp > 1 and self.zero_stage == 3 and cfg["zero_optimization"].get("reduce_scatter", True) is False:
            # Without it DeepSpeed 0.19 averages some gradient buckets over data-parallel ranks and
            # others over all ranks, so no single loss scale is right.
            return "sequence parallelism at ZeRO-3 needs zero_optimization.reduce_scatter true (its default)"
        if tp > 1 and self.zero_stage == 3:
            return ("tensor parallelism (tensor_parallel.autotp_size) runs with ZeRO stage 0, 1 or 2, not 3; use "
                    "ds_configs/zero2_tp2.json or set zero_optimization.stage to 1 or 2")
        return None

    def refusal(self, config, seq_len: int, supports: Supports, objective: str, uses: Uses = Uses()) -> str | None:
        """Why this layout cannot run `config` at `seq_len` for an objective (named `objective`) that
        `supports` what it does, with what else the run `uses`; None when it can."""
        if uses.compiled and not supports.compiled:
            return (f"--torch_compile is not supported with {objective}: {supports.why_not_compiled}; drop "
                    "--torch_compile (or compile.deepcompile) to run it eagerly")
        if problem := _experts_refusal(self, config, supports, objective, uses):
            return problem
        if self.mode is None:
            return None
        what = self.what()
        if not supports.allows(self.mode):
            return f"{what} is not supported with {objective} ({supports.why_not}); use a data-parallel/ZeRO config"
        if uses.adapters:
            return f"{what} is not supported with LoRA (--use_peft) yet; use a data-parallel/ZeRO config"
        if uses.compiled:
            return (f"--torch_compile with {what} is not supported by these recipes; drop --torch_compile (or "
                    "compile.deepcompile) to run it eagerly")
        if self.mode == "pipeline" and uses.downstream_eval:
            return (f"--eval_tasks runs lm-evaluation-harness on the whole live model, which {what} splits over its "
                    "stages; evaluate the export with tools/evaluate.py instead")
        if self.mode == "pipeline" and uses.activation_checkpointing:
            return (f"--activation_checkpointing with {what}: the pipeline engine checkpoints layers itself; set "
                    "pipeline.activation_checkpoint_interval in the DeepSpeed JSON (1: every layer) instead")
        return {"sequence": _sequence_refusal, "tensor": _tensor_refusal,
                "pipeline": _pipeline_refusal}[self.mode](self, what, config, seq_len)


def _expert_problem(layout: Layout, block: dict[str, Any]) -> str | None:
    """What DeepSpeed's AutoEP (0.19.8) does not combine with, said before any rank starts."""
    if "load_balance_coeff" in block:
        return ("expert_parallel.load_balance_coeff is not supported by DeepSpeed's AutoEP; drop it: the router's "
                "load-balancing loss is added by the recipe (--router_aux_loss_coef)")
    if layout.expert == 1:
        return None
    if layout.pipeline > 1 or layout.sequence > 1 or layout.tensor > 1:
        other = ("pipeline.stages" if layout.pipeline > 1 else "sequence_parallel_size" if layout.sequence > 1
                 else "tensor_parallel.autotp_size")
        return (f"expert_parallel.autoep_size {layout.expert} and {other} are both above 1; these recipes combine "
                "expert parallelism with data parallelism only")
    etp = block.get("expert_tensor_parallel_size", 1)
    if etp != 1:
        return f"expert_parallel.expert_tensor_parallel_size {etp}: only 1 is supported (experts are not split further)"
    if layout.world % layout.expert:
        return (f"expert_parallel.autoep_size {layout.expert} does not divide the {layout.world} ranks; launch a "
                f"multiple of {layout.expert} ranks")
    if block.get("comm_backend", "comm") != "comm":
        return (f"expert_parallel.comm_backend {block['comm_backend']!r} runs on GPUs with DeepEP only; use \"comm\" "
                "(the default)")
    return None


def _experts_refusal(layout: Layout, config, supports: Supports, objective: str, uses: Uses) -> str | None:
    """Why a mixture-of-experts model (or expert parallelism) cannot run as asked; None when it can."""
    from gpt_recipes.parallel.experts import moe_shape

    shape = moe_shape(config)
    if shape is None:
        return None if layout.expert == 1 else (
            f"expert_parallel.autoep_size {layout.expert}: model type {config.model_type!r} has no experts; use a "
            "mixture-of-experts model (e.g. --model mixtral-nano) or a JSON without \"expert_parallel\"")
    if not supports.experts:
        return (f"mixture-of-experts models are not supported with {objective} yet (its loss does not add the "
                "router's load-balancing loss); pretrain or fine-tune them with next-token prediction")
    if uses.adapters:
        return "LoRA (--use_peft) on a mixture-of-experts model is not supported yet; fine-tune every weight"
    if uses.compiled:
        return "--torch_compile with a mixture-of-experts model is not supported by these recipes; drop it"
    if layout.mode is not None:
        return (f"{layout.what()} with a mixture-of-experts model: these recipes run MoE models with data and "
                "expert parallelism (\"expert_parallel\") only")
    if shape.experts % layout.expert:
        return (f"expert_parallel.autoep_size {layout.expert} does not divide the model's {shape.experts} experts; "
                "each expert-parallel rank holds an equal share")
    return None


def _heads(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _sequence_refusal(layout: Layout, what: str, config, seq_len: int) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from gpt_recipes.parallel.sequence_tensor import SP_ATTENTION

    heads, kv_heads = _heads(config)
    if not getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", False):
        return (f"{what}: model type {config.model_type!r} has no '{SP_ATTENTION}' attention implementation, which "
                "DeepSpeed Ulysses wraps; use a GPT-2 or Llama-family model")
    if heads % layout.sequence:
        return f"{what}: the model's {heads} attention heads do not divide by {layout.sequence}"
    if kv_heads % layout.sequence and layout.sequence % kv_heads:
        return f"{what}: the model's {kv_heads} key-value heads and {layout.sequence} do not divide one another"
    if seq_len % layout.sequence:
        return f"{what}: --seq_len {seq_len} does not divide by {layout.sequence}; each rank keeps an equal part"
    window = _sliding_window(config)
    if window is not None and seq_len > window:
        # Ulysses attends with a causal (or a packed batch's) mask over the gathered sequence; a window
        # lives in transformers' mask for the local part, which it drops. Measured: a Gemma 3 with a
        # 16-token window at seq_len 128 lost 0.015 of first-step loss against data parallelism.
        return (f"{what}: the model's sliding-window attention ({window} tokens) is not kept by DeepSpeed Ulysses, "
                f"which attends over the whole sequence; use --seq_len {window} or less, or data parallelism")
    return None


def _sliding_window(config) -> int | None:
    """The window of a model with sliding-window attention layers (Mistral, Gemma 2/3, Qwen with
    use_sliding_window), or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _tensor_refusal(layout: Layout, what: str, config, seq_len: int) -> str | None:
    if config.model_type == "gpt2":
        return (f"{what}: GPT-2 keeps its projections in Conv1D layers, which DeepSpeed's AutoTP does not split; use "
                "a Llama-family model (e.g. --model llama-micro) or sequence parallelism")
    if config.model_type not in TP_MODEL_TYPES:
        return (f"{what}: model type {config.model_type!r} is not one these recipes split and export "
                f"({', '.join(TP_MODEL_TYPES)})")
    heads, kv_heads = _heads(config)
    for name, value in (("attention heads", heads), ("key-value heads", kv_heads),
                        ("MLP width", config.intermediate_size)):
        if value % layout.tensor:
            return f"{what}: the model's {value} {name} do not divide by {layout.tensor}"
    return None


def _pipeline_refusal(layout: Layout, what: str, config, seq_len: int) -> str | None:
    from gpt_recipes.parallel.pipeline import FAMILIES

    if config.model_type not in FAMILIES:
        return f"{what} is built for the {' and '.join(FAMILIES)} families, not {config.model_type!r}"
    if layout.pipeline > config.num_hidden_layers:
        return f"{what} needs at least one decoder block per stage; the model has {config.num_hidden_layers}"
    if layout.partition.startswith("type:"):
        return _partition_refusal(layout, config)
    return None


def _partition_refusal(layout: Layout, config) -> str | None:
    """A "type:REGEX" partition must be a regex that matches at least one layer per stage, as DeepSpeed
    matches it: against each pipeline layer's class name, ignoring case."""
    import re

    from gpt_recipes.parallel.pipeline import layer_classes

    pattern = layout.partition.split(":", 1)[1]
    classes = layer_classes(config)
    try:
        matched = [name for name in classes if re.search(pattern, name, re.IGNORECASE)]
    except re.error as err:
        return f"pipeline.partition {layout.partition!r}: {pattern!r} is not a regular expression ({err})"
    if len(matched) < layout.pipeline:
        return (f"pipeline.partition {layout.partition!r} matches {len(matched)} of the pipeline's layers, fewer than "
                f"its {layout.pipeline} stages; the layers' classes are {', '.join(dict.fromkeys(classes))} "
                "(type:Block cuts between decoder blocks)")
    return None


def _positive(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"DeepSpeed config: {key} must be a positive integer, got {value!r}")
    return value


def _sequence_and_tensor(cfg: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    tp_block = cfg.get("tensor_parallel", {})
    if not isinstance(tp_block, dict):
        raise UserError("DeepSpeed config: tensor_parallel must be an object such as {\"autotp_size\": 2}")
    sp = _positive("sequence_parallel_size", cfg.get("sequence_parallel_size", 1))
    tp = _positive("tensor_parallel.autotp_size", tp_block.get("autotp_size", 1) or 1)
    return sp, tp, tp_block


def _expert(cfg: dict[str, Any]) -> int:
    """The expert-parallel degree of the JSON's "expert_parallel" section (DeepSpeed AutoEP); 0 when off."""
    block = cfg.get("expert_parallel", {})
    if not isinstance(block, dict):
        raise UserError("DeepSpeed config: expert_parallel must be an object such as {\"enabled\": true, \"autoep_size\": 2}")
    if not block.get("enabled", False):
        return 0
    return _positive("expert_parallel.autoep_size", block.get("autoep_size", 1))


def _pipeline(cfg: dict[str, Any]) -> tuple[int, str, int]:
    """(stages, partition method, activation checkpoint interval) of the JSON's "pipeline" section."""
    block = cfg.get("pipeline", {})
    if not isinstance(block, dict):
        raise UserError("DeepSpeed config: pipeline must be an object such as {\"stages\": 2}")
    stages = block.get("stages", "auto")
    # DeepSpeed's default "auto" lets the model decide; these recipes build no pipeline unless asked.
    stages = 1 if stages == "auto" else _positive("pipeline.stages", stages)
    if stages == 1:
        return 1, "parameters", 0
    partition = block.get("partition", "best")
    partition = "parameters" if partition == "best" else partition  # DeepSpeed's default names no method
    if not isinstance(partition, str) or not (partition in PARTITIONS or partition.startswith("type:")):
        raise UserError(f"DeepSpeed config: pipeline.partition {partition!r} is not one of parameters, uniform or "
                        "type:REGEX")
    interval = block.get("activation_checkpoint_interval", 0)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise UserError(f"DeepSpeed config: pipeline.activation_checkpoint_interval must be a whole number >= 0, got "
                        f"{interval!r}")
    return stages, partition, interval
