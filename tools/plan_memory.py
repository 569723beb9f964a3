#!/usr/bin/env python
"""Predict per-rank memory (model states and activations) for each DeepSpeed config.

    python tools/plan_memory.py --model gpt2-medium --ranks 2                # CPU ranks, this machine
    python tools/plan_memory.py --model llama-1b --ranks 8 --nodes 2 --gpu_mem 80 --seq_len 2048
    python tools/plan_memory.py --model llama-1b --ranks 2 --gpu_mem 24 --lora_r 16     # LoRA fine-tuning

Model states follow the ZeRO paper's accounting plus DeepSpeed's buffers; DeepSpeed's own
estimators are shown beside them for stages 2 and 3. Activations come from tracing one
forward pass of the model on the meta device. A config "fits" when the prediction times a
headroom factor (1.25 on a GPU; 1.8 on a CPU, where the C allocator keeps freed memory)
plus the runtime (1 GiB per GPU, 0.5 GiB per CPU rank) fits; the recommendation is the
fitting config that communicates least.
"""

import glob
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from gpt_recipes.args import AdapterArgs, flag, parse_args
from gpt_recipes.ds_config import batch_layout, load_config
from gpt_recipes.ds_config_keys import check_keys
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.metrics.memory_plan import (
    PREFERENCE,
    HEADROOM,
    GiB,
    MemoryConfig,
    activation_bytes,
    model_sizes,
    plan,
    recommend,
    tensor_parallel_slice,
)
from gpt_recipes.models.adapters import lora_config
from gpt_recipes.models.causal_lm import build_config, check_seq_len
from gpt_recipes.parallel import pipeline
from gpt_recipes.parallel.layout import Uses
from gpt_recipes.train.lm import NextToken


@dataclass
class PlanMemoryArgs:
    """Predict per-rank memory of a model under each DeepSpeed config, and recommend one."""

    model: str = flag("gpt2-nano", "model preset name or a model config JSON (as for recipes/pretrain.py)")
    ranks: int = flag(1, "ranks (GPUs, or processes on a CPU) per node")
    nodes: int = flag(1, "nodes")
    gpu_mem: Optional[float] = flag(None, "memory per GPU in GiB (default: plan for CPU ranks sharing host memory)")
    host_mem: Optional[float] = flag(None, "host memory per node in GiB (default: this machine's for CPU ranks; for "
                                     "GPUs, not checked)")
    seq_len: Optional[int] = flag(None, "tokens per sample (default: the model's context length)")
    micro_batch: Optional[int] = flag(None, "samples per rank per forward (default: each config's "
                                      "train_micro_batch_size_per_gpu)")
    vocab_size: int = flag(8192, "vocabulary size, unless the model config states one")
    activation_checkpointing: bool = flag(False, "plan for --activation_checkpointing")
    lora_r: Optional[int] = flag(None, "plan for LoRA adapters of this rank (recipes/finetune.py --use_peft): only "
                                 "they have gradients and optimizer state")
    lora_target_modules: Optional[list[str]] = flag(None, "with --lora_r: the adapted modules, as for "
                                                    "recipes/finetune.py (default: all-linear)")
    configs: list[str] = flag(["ds_configs/*.json"], "DeepSpeed JSON files or globs to compare")


def host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def config_files(patterns: list[str]) -> list[Path]:
    files = sorted({Path(f) for pattern in patterns for f in (glob.glob(pattern) or [pattern])})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"DeepSpeed config {missing[0]} does not exist")
    return files


UNITS = {"GiB": GiB, "MiB": 2**20}


@dataclass
class Planning:
    """What every row of the plan shares: the model, its sizes, the ranks and the memory to fit."""

    args: PlanMemoryArgs
    config: object  # the model's PretrainedConfig
    seq_len: int
    lora: object  # peft's LoraConfig, or None
    sizes: object  # memory_plan.ModelSizes
    device: float | None  # bytes per GPU, or None for CPU ranks
    host: float | None  # bytes of host memory per node, or None (not checked)
    traced: dict = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        return self.args.ranks * self.args.nodes

    def refusal(self, layout: MemoryConfig) -> str | None:
        """Why the recipes refuse this JSON's layout for the model: the runner's own check
        (parallel/layout.py), for pretraining, or LoRA fine-tuning with --lora_r."""
        objective = NextToken(one_length=self.lora is None)
        return layout.parallel.refusal(self.config, self.seq_len, objective.supports, "LoRA fine-tuning" if self.lora
                                       else "pretraining", Uses(adapters=self.lora is not None,
                                                                activation_checkpointing=self.args.activation_checkpointing))

    def per_sample(self, layout: MemoryConfig, checkpointing: bool | None = None) -> float:
        """Activation bytes per sample. ZeRO-3 and tensor parallelism take the plain loss (see
        gpt_recipes/models/loss.py), the others the fused one; a sequence-parallel rank holds the
        activations of its 1/sp of the tokens; a pipeline stage its micro-batches in flight."""
        checkpointing = self.args.activation_checkpointing if checkpointing is None else checkpointing
        sp, tp, pp = layout.parallel.sequence, layout.parallel.tensor, layout.parallel.pipeline
        key = (layout.precision, layout.micro_batch, layout.stage < 3 and tp == 1, sp, tp, checkpointing)
        if key not in self.traced:
            self.traced[key] = activation_bytes(tensor_parallel_slice(self.config, tp), layout.micro_batch,
                                                self.seq_len // sp, layout.precision, checkpointing,
                                                fused_loss=key[2], lora=self.lora) / layout.micro_batch
        if pp > 1:  # the fullest stage's micro-batches in flight, for its share of the blocks
            return self.traced[key] * self.sizes.pipeline_activation_factor(pp, layout.parallel.partition,
                                                                           layout.grad_accum)
        return self.traced[key]

    def rows(self, layouts: list[MemoryConfig]) -> list:
        return [row for layout in layouts for row in plan([layout], self.sizes, self.per_sample(layout),
                                                            self.args.ranks, self.args.nodes, self.device, self.host)]


def start_planning(args: PlanMemoryArgs) -> Planning:
    if args.ranks < 1 or args.nodes < 1:
        raise UserError("--ranks and --nodes must be at least 1")
    for name in ("gpu_mem", "host_mem", "micro_batch"):
        value = vars(args)[name]
        if value is not None and not value > 0:
            raise UserError(f"--{name} must be positive, got {value}")
    config = build_config(args.model, args.vocab_size, eos_token_id=0)
    seq_len = check_seq_len(config, args.seq_len)
    lora = None
    if args.lora_r is not None:
        lora = lora_config(AdapterArgs(use_peft=True, lora_r=args.lora_r, lora_target_modules=args.lora_target_modules),
                           config, args.model)
    elif args.lora_target_modules:
        raise UserError("--lora_target_modules needs --lora_r")
    device = args.gpu_mem * GiB if args.gpu_mem else None
    # This machine's memory describes CPU ranks run here, not the hosts of a GPU cluster.
    host = args.host_mem * GiB if args.host_mem else None if device else host_memory_bytes()
    return Planning(args, config, seq_len, lora, model_sizes(config, lora), device, host)


def configs_to_plan(planning: Planning) -> list[MemoryConfig]:
    """Each JSON's memory settings, as the recipes resolve it on this many ranks; the JSONs they would
    refuse are left out with the reason."""
    args, layouts = planning.args, []
    for path in config_files(args.configs):
        cfg = load_config(path)
        try:  # the batch as the recipe resolves it for this many ranks ("auto" and missing keys derived)
            batch_layout(cfg, planning.ranks)
            check_keys(cfg)  # a key DeepSpeed does not read would plan what no run does
        except UserError as err:
            print(f"{path.stem}: left out, the recipes would refuse it on {planning.ranks} rank(s): {err}")
            continue
        layout = MemoryConfig.from_config(path.stem, cfg, planning.ranks)
        if args.micro_batch:
            layout = replace(layout, micro_batch=args.micro_batch)
        refused = planning.refusal(layout)
        if refused:
            print(f"{layout.name}: left out, the recipes refuse it for {args.model}: {refused}")
            continue
        layouts.append(layout)
    return layouts


@cli_entry
def main() -> None:
    args = parse_args(PlanMemoryArgs, description=__doc__)
    planning = start_planning(args)
    layouts = configs_to_plan(planning)
    rows = planning.rows(layouts)
    if not rows:
        raise UserError(f"none of the configs can run {args.model} on {planning.ranks} rank(s); the lines "
                        "above say why")
    print_table(planning, rows)
    best = recommend(rows)
    # A sequence, tensor or pipeline split only when plain data parallelism cannot fit by itself
    # with a smaller micro-batch or activation checkpointing: the split costs batch or time.
    splits = best is not None and best.estimate.layout.parallel.group > 1
    alternatives = data_parallel_alternatives(planning, layouts, rows) if best is None or splits else []
    print_advice(planning, rows, None if alternatives else best)
    if alternatives:
        print(f"\nRecommended: plain data parallelism, {alternatives[0]} (with a smaller micro-batch, raise "
              "gradient_accumulation_steps to keep the global batch; --micro_batch N plans another here)")
        if alternatives[1:]:
            print("  Also fits: " + "; ".join(alternatives[1:]))
        if splits:
            layout = best.estimate.layout
            print(f"  ds_configs/{layout.name}.json fits as it is, splitting each sample over "
                  f"{layout.parallel.group} ranks ({layout.parallel.what()}): worth it only when data parallelism does "
                  f"not fit, as its global batch is 1/{layout.parallel.group} of the same keys' in a data-parallel "
                  "config")


def print_table(planning: Planning, rows: list) -> None:
    args, sizes, device, host = planning.args, planning.sizes, planning.device, planning.host
    where = f"{args.gpu_mem:g} GiB GPUs" if device else "CPU ranks sharing host memory"
    host_text = f"host {host / GiB:.1f} GiB per node" if host else "host memory not given"
    print(f"{args.model}: {sizes.total / 1e6:.1f}M parameters, seq_len {planning.seq_len}; {args.ranks} rank(s) per "
          f"node x {args.nodes} node(s) ({where}; {host_text})"
          f"{'; activation checkpointing' if args.activation_checkpointing else ''}")
    if planning.lora is not None:
        lora = planning.lora
        print(f"LoRA r {lora.r} on {', '.join(sorted(lora.target_modules))}: {sizes.trainable / 1e6:.2f}M trainable "
              f"parameters ({sizes.trainable / sizes.total:.2%}); the base has weights only (DeepSpeed's estimators "
              "assume every parameter trains, so they are not shown)")
    # Small models read in MiB: at two decimals of a GiB their model states would all be 0.00.
    unit = "GiB" if max(row.need for row in rows) >= GiB else "MiB"
    size = lambda value: f"{value / UNITS[unit]:.2f}" if unit == "GiB" else f"{value / UNITS[unit]:.1f}"  # noqa: E731
    print(f"{unit} per rank | params grads optim buffers = model states | activations (micro-batch) | offloaded to host "
          f"| DeepSpeed's estimate device/host-per-node | need (x{HEADROOM['cuda' if device else 'cpu']} + runtime) | fits")
    header = (f"{'config':15s} {'ZeRO':>4s} {'prec':>4s} {'params':>7s} {'grads':>6s} {'optim':>6s} {'buffers':>7s} "
              f"{'states':>7s} {'activ':>6s} {'mb':>3s} {'host':>6s} {'DeepSpeed':>13s} {'need':>7s}  fits")
    print(header)
    print("-" * len(header))
    for row in rows:
        e, layout = row.estimate, row.estimate.layout
        ds = f"{size(row.deepspeed[0])}/{size(row.deepspeed[1])}" if row.deepspeed else "-"
        print(f"{layout.name:15s} {layout.stage:>4d} {layout.precision:>4s} {size(e.params):>7s} {size(e.grads):>6s} "
              f"{size(e.optimizer):>6s} {size(e.buffers):>7s} {size(e.model_states):>7s} {size(e.activations):>6s} "
              f"{layout.micro_batch:>3d} {size(e.host):>6s} {ds:>13s} {size(row.need):>7s}  "
              f"{row.verdict}")
    for row in rows:
        print_pipeline(planning, row.estimate.layout)


def print_pipeline(planning: Planning, layout: MemoryConfig) -> None:
    pp, m = layout.parallel.pipeline, layout.grad_accum
    if pp == 1:
        return
    stages = planning.sizes.stage_parameters(pp, layout.parallel.partition)
    print(f"{layout.name}: {pp} pipeline stages x {planning.ranks // pp} data-parallel pipeline(s); parameters per "
          f"stage {' / '.join(f'{n / 1e6:.2f}M' for n in stages)} (the table shows the fullest); activations of up "
          f"to {min(m, pp)} micro-batches in flight on stage 0 (1F1B); bubble (P-1)/(m+P-1) = "
          f"{pipeline.bubble(pp, m):.0%} of each step at m = {m} micro-batches")


def print_advice(planning: Planning, rows: list, best) -> None:
    device, host = planning.device, planning.host
    if device:
        print("\nOffloading configs fit only if their node's host memory holds the offloaded states of its ranks, by "
              "this estimate and by DeepSpeed's (the larger). DeepSpeed's host figure for a config without offload "
              "counts each rank building the whole fp32 model in host memory at start-up; the recipes build it on the "
              "device (ZeRO-3: partitioned), so that figure is not a limit here.")
        if any(row.verdict == "yes*" for row in rows):
            print("yes*: fits the GPU; the host memory was not checked (give --host_mem, in GiB per node).")
    if best is None and not any(row.fits for row in rows):
        print("\nNothing fits: add ranks or nodes, lower the micro-batch (raise gradient_accumulation_steps to keep "
              "the global batch), or use --activation_checkpointing.")
        host_bound = [row.estimate.layout.name for row in rows if device and row.need <= device and host
                      and row.host_need > host]
        if host_bound:
            one = len(host_bound) == 1
            print(f"{', '.join(host_bound)} {'fits' if one else 'fit'} the GPUs but not the host memory "
                  f"({host / GiB:g} GiB per node): with more host memory, or the ranks spread over more nodes, "
                  f"{'it' if one else 'they'} would fit.")
        return
    if best is None:
        return
    layout = best.estimate.layout
    print(f"\nRecommended: ds_configs/{layout.name}.json (fits, and communicates least)")
    group = layout.parallel.group
    if group > 1:
        per = {"sequence": "sequence", "tensor": "layer", "pipeline": "pipeline"}[layout.parallel.mode]
        print(f"  Its {group} ranks per {per} read the same samples: the global batch is micro-batch x accumulation x "
              f"{planning.ranks // group} data-parallel rank(s), 1/{group} of what the same batch keys give a "
              f"data-parallel config; raise gradient_accumulation_steps {group}x to keep it.")


def data_parallel_alternatives(planning: Planning, layouts: list[MemoryConfig], rows: list) -> list[str]:
    """For the data-parallel configs (no S, T or P) that do not fit as they are: a smaller micro-batch,
    or activation checkpointing, with which they would."""
    args, found = planning.args, []
    fitting = {row.estimate.layout.name for row in rows if row.fits}

    def fits(candidate: MemoryConfig, per_sample: float) -> bool:
        return plan([candidate], planning.sizes, per_sample, args.ranks, args.nodes, planning.device,
                    planning.host)[0].fits

    for layout in layouts:
        if layout.parallel.group > 1 or layout.name in fitting:
            continue
        order = PREFERENCE.index(layout.name) if layout.name in PREFERENCE else len(PREFERENCE)
        # Activations grow with the micro-batch sample by sample: the traced figure per sample serves all.
        per_sample = planning.per_sample(layout)
        smaller = next((m for m in range(layout.micro_batch - 1, 0, -1)
                        if fits(replace(layout, micro_batch=m), per_sample)), None)
        if smaller:
            found.append(((0, -smaller, order), f"ds_configs/{layout.name}.json with --ds "
                                                f"train_micro_batch_size_per_gpu={smaller}"))
        if not args.activation_checkpointing and fits(layout, planning.per_sample(layout, True)):
            found.append(((1, -layout.micro_batch, order), f"ds_configs/{layout.name}.json with "
                                                           "--activation_checkpointing"))
    # The largest micro-batch first (it keeps the device busiest), then the least communication.
    return [text for _, text in sorted(found)[:3]]


if __name__ == "__main__":
    main()
