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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt_recipes.args import AdapterArgs, flag, parse_args
from gpt_recipes.ds_config import batch_layout, load_config
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.metrics.memory_plan import (
    HEADROOM,
    GiB,
    Layout,
    activation_bytes,
    model_sizes,
    plan,
    recommend,
    tensor_parallel_slice,
)
from gpt_recipes.models.adapters import lora_config
from gpt_recipes.models.causal_lm import build_config, check_seq_len
from gpt_recipes.parallel import pipeline


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


@cli_entry
def main() -> None:
    args = parse_args(PlanMemoryArgs, description=__doc__)
    if args.ranks < 1 or args.nodes < 1:
        raise UserError("--ranks and --nodes must be at least 1")
    for name in ("gpu_mem", "host_mem", "micro_batch"):
        value = getattr(args, name)
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
    sizes = model_sizes(config, lora)
    layouts = []
    for path in config_files(args.configs):
        cfg = load_config(path)
        try:  # the batch as the recipe resolves it for this many ranks ("auto" and missing keys derived)
            batch_layout(cfg, args.ranks * args.nodes)
        except UserError as err:
            print(f"{path.stem}: left out, the recipes would refuse it on {args.ranks * args.nodes} rank(s): {err}")
            continue
        layout = Layout.from_config(path.stem, cfg)
        if args.micro_batch:
            layout = Layout(**{**layout.__dict__, "micro_batch": args.micro_batch})
        layouts.append(layout)
    traced: dict[tuple, float] = {}

    def refused(layout: Layout) -> str | None:
        """Why the recipes refuse this layout for this model, or None."""
        if seq_len % layout.sp:
            return f"seq_len {seq_len} does not divide by its sequence-parallel size {layout.sp}"
        if layout.tp > 1 and config.model_type == "gpt2":
            return "tensor parallelism does not split GPT-2's Conv1D projections (use a Llama-family model)"
        if layout.pp > 1 and (lora is not None or not sizes.layers):
            return "a pipeline runs pretraining of the GPT-2 and Llama families only (no LoRA)"
        if layout.pp > config.num_hidden_layers:
            return f"{layout.pp} pipeline stages need at least as many decoder blocks; the model has " \
                   f"{config.num_hidden_layers}"
        return None

    def per_sample(layout: Layout, checkpointing: bool = args.activation_checkpointing) -> float:
        # ZeRO-3 and tensor parallelism take the plain loss (see gpt_recipes/models/loss.py), the others the fused
        # one; a sequence-parallel rank holds the activations of its 1/sp of the tokens.
        key = (layout.precision, layout.micro_batch, layout.stage < 3 and layout.tp == 1, layout.sp, layout.tp,
               checkpointing)
        if key not in traced:
            traced[key] = activation_bytes(tensor_parallel_slice(config, layout.tp), layout.micro_batch,
                                           seq_len // layout.sp, layout.precision, checkpointing,
                                           fused_loss=key[2], lora=lora) / layout.micro_batch
        if layout.pp > 1:  # the fullest stage's micro-batches in flight, for its share of the blocks
            return traced[key] * sizes.pipeline_activation_factor(layout.pp, layout.partition, layout.grad_accum)
        return traced[key]

    device = args.gpu_mem * GiB if args.gpu_mem else None
    # This machine's memory describes CPU ranks run here, not the hosts of a GPU cluster.
    host = args.host_mem * GiB if args.host_mem else None if device else host_memory_bytes()

    rows = []
    for layout in layouts:
        if (args.ranks * args.nodes) % (layout.sp * layout.tp * layout.pp):
            print(f"{layout.name}: left out, its sequence/tensor/pipeline-parallel size does not divide "
                  f"{args.ranks * args.nodes} ranks")
            continue
        if refused(layout):
            print(f"{layout.name}: left out, the recipes refuse it for {args.model}: {refused(layout)}")
            continue
        rows += plan([layout], sizes, per_sample(layout), args.ranks, args.nodes, device, host)
    if not rows:
        raise UserError(f"none of the configs can run {args.model} on {args.ranks * args.nodes} rank(s); the lines "
                        "above say why")
    where = f"{args.gpu_mem:g} GiB GPUs" if device else "CPU ranks sharing host memory"
    host_text = f"host {host / GiB:.1f} GiB per node" if host else "host memory not given"
    print(f"{args.model}: {sizes.total / 1e6:.1f}M parameters, seq_len {seq_len}; {args.ranks} rank(s) per node x "
          f"{args.nodes} node(s) ({where}; {host_text})"
          f"{'; activation checkpointing' if args.activation_checkpointing else ''}")
    if lora is not None:
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
        layout = row.estimate.layout
        if layout.pp > 1:
            stages = sizes.stage_parameters(layout.pp, layout.partition)
            print(f"{layout.name}: {layout.pp} pipeline stages x {args.ranks * args.nodes // layout.pp} data-parallel "
                  f"pipeline(s); parameters per stage {' / '.join(f'{n / 1e6:.2f}M' for n in stages)} (the table "
                  f"shows the fullest); activations of up to {min(layout.grad_accum, layout.pp)} micro-batches in "
                  f"flight on stage 0 (1F1B); bubble (P-1)/(m+P-1) = {pipeline.bubble(layout.pp, layout.grad_accum):.0%} "
                  f"of each step at m = {layout.grad_accum} micro-batches")
    if device:
        print("\nOffloading configs fit only if their node's host memory holds the offloaded states of its ranks, by "
              "this estimate and by DeepSpeed's (the larger). DeepSpeed's host figure for a config without offload "
              "counts each rank building the whole fp32 model in host memory at start-up; the recipes build it on the "
              "device (ZeRO-3: partitioned), so that figure is not a limit here.")
        if any(row.verdict == "yes*" for row in rows):
            print("yes*: fits the GPU; the host memory was not checked (give --host_mem, in GiB per node).")
    best = recommend(rows)
    if best is None:
        print("\nNothing fits: add ranks or nodes, lower the micro-batch (raise gradient_accumulation_steps to keep "
              "the global batch), or use --activation_checkpointing.")
        host_bound = [row.estimate.layout.name for row in rows if device and row.need <= device and host
                      and row.host_need > host]
        if host_bound:
            one = len(host_bound) == 1
            print(f"{', '.join(host_bound)} {'fits' if one else 'fit'} the GPUs but not the host memory "
                  f"({host / GiB:g} GiB per node): with more host memory, or the ranks spread over more nodes, "
                  f"{'it' if one else 'they'} would fit.")
    else:
        layout = best.estimate.layout
        print(f"\nRecommended: ds_configs/{layout.name}.json (fits, and communicates least)")
        if layout.sp * layout.tp * layout.pp > 1:
            group = layout.sp * layout.tp * layout.pp
            print(f"  Its {group} ranks per {'sequence' if layout.sp > 1 else 'layer' if layout.tp > 1 else 'pipeline'} "
                  f"read the same samples: the global "
                  f"batch is micro-batch x accumulation x {args.ranks * args.nodes // group} data-parallel rank(s), "
                  f"1/{group} of what the same batch keys give a data-parallel config; raise "
                  f"gradient_accumulation_steps {group}x to keep it.")
    if best is None or best.estimate.layout.sp * best.estimate.layout.tp * best.estimate.layout.pp > 1:
        alternatives = data_parallel_alternatives(layouts, rows, sizes, per_sample, args, device, host)
        if alternatives:
            print("Plain data parallelism fits too with: " + "; ".join(alternatives) + " (raise "
                  "gradient_accumulation_steps as the micro-batch falls, to keep the global batch)")


def data_parallel_alternatives(layouts, rows, sizes, per_sample, args, device, host) -> list[str]:
    """For the data-parallel configs (no S or T) that do not fit as they are: a smaller micro-batch,
    or activation checkpointing, with which they would."""
    found = []
    fitting = {row.estimate.layout.name for row in rows if row.fits}
    for layout in layouts:
        if layout.sp * layout.tp * layout.pp > 1 or layout.name in fitting:
            continue

        def fits(candidate: Layout, checkpointing: bool) -> bool:
            return plan([candidate], sizes, per_sample(candidate, checkpointing), args.ranks, args.nodes, device,
                         host)[0].fits

        smaller = next((m for m in range(layout.micro_batch - 1, 0, -1)
                        if fits(Layout(**{**layout.__dict__, "micro_batch": m}), args.activation_checkpointing)), None)
        if smaller:
            found.append(f"{layout.name} at micro-batch {smaller} (--micro_batch {smaller})")
        if not args.activation_checkpointing and fits(layout, True):
            found.append(f"{layout.name} with --activation_checkpointing")
        if len(found) >= 3:
            break
    return found[:3]


if __name__ == "__main__":
    main()
