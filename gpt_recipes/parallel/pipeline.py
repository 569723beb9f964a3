"""Pipeline parallelism: a transformers causal LM as DeepSpeed pipeline layers, and its training step.

When the JSON's "pipeline" section asks for P > 1 stages, the model the recipe built (the same
class and seed as every other run, so the same weights) is cut into a sequence of layers that
wrap its own modules: token embedding, (GPT-2) position embedding, each decoder block, final
norm, output layer. DeepSpeed's PipelineModule keeps the layers of this rank's stage and drops
the rest. A tied output layer (GPT-2, tied Llama) is DeepSpeed's tied layer: the first and last
stages each hold the embedding and all-reduce its gradient. Only the hidden states travel
between stages; positions are recomputed from their shape (pretraining windows start at 0).

The step (train/lm.py, PipelineStep) is engine.train_batch: the JSON's gradient_accumulation_steps
micro-batches in flight (1F1B), the ranks of one pipeline reading the same samples, data-parallel
pipelines disjoint ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt_recipes import console
from gpt_recipes.errors import UserError

LAYERS_FILE = "pipeline_layers.json"  # in each checkpoint: which Hugging Face module each layer file holds


# --- Layers: thin wrappers holding the model's own modules --------------------------------------


class Embedding(nn.Module):
    """Token ids -> embeddings; as a tied layer, also the output layer (`tied_logits`)."""

    def __init__(self, module: nn.Embedding):
        super().__init__()
        self.module = module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids)


def tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.module.weight)


class Positions(nn.Module):
    """GPT-2's learned position embedding, added to the token embedding (then its dropout)."""

    def __init__(self, module: nn.Embedding, dropout: nn.Module):
        super().__init__()
        self.module, self.dropout = module, dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        return self.dropout(hidden + self.module(positions)[None])


class Layer(nn.Module):
    """A module that maps hidden states to hidden states (or logits)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module(hidden)


class Block(Layer):
    """A GPT-2 decoder block (causal attention by its own mask-free path)."""


class Norm(Layer):
    """The final norm."""


class Head(Layer):
    """An untied output layer."""


class RotaryBlock(nn.Module):
    """A Llama decoder block with the rotary angles of positions 0..T-1 (the rotary module has no
    weights, so each stage holds its own)."""

    def __init__(self, module: nn.Module, rotary: nn.Module):
        super().__init__()
        self.module, self.rotary = module, rotary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return self.module(hidden, position_ids=positions, position_embeddings=self.rotary(hidden, positions))


def _gpt2(model) -> list[tuple[Any, str | None]]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    t = model.transformer
    tied = model.config.tie_word_embeddings
    layers = [(TiedLayerSpec("embed", Embedding, t.wte, tied_weight_attr="module.weight") if tied
               else LayerSpec(Embedding, t.wte), "transformer.wte"),
              (LayerSpec(Positions, t.wpe, t.drop), "transformer.wpe")]
    layers += [(LayerSpec(Block, block), f"transformer.h.{i}") for i, block in enumerate(t.h)]
    layers.append((LayerSpec(Norm, t.ln_f), "transformer.ln_f"))
    layers.append((TiedLayerSpec("embed", Embedding, t.wte, forward_fn=tied_logits, tied_weight_attr="module.weight"),
                   None) if tied else (LayerSpec(Head, model.lm_head), "lm_head"))
    return layers


def _llama(model) -> list[tuple[Any, str | None]]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m = model.model
    tied = model.config.tie_word_embeddings
    layers = [(TiedLayerSpec("embed", Embedding, m.embed_tokens, tied_weight_attr="module.weight") if tied
               else LayerSpec(Embedding, m.embed_tokens), "model.embed_tokens")]
    layers += [(LayerSpec(RotaryBlock, block, m.rotary_emb), f"model.layers.{i}") for i, block in enumerate(m.layers)]
    layers.append((LayerSpec(Norm, m.norm), "model.norm"))
    layers.append((TiedLayerSpec("embed", Embedding, m.embed_tokens, forward_fn=tied_logits,
                                 tied_weight_attr="module.weight"), None) if tied
                  else (LayerSpec(Head, model.lm_head), "lm_head"))
    return layers


FAMILIES = {"gpt2": _gpt2, "llama": _llama}


def layer_classes(config) -> list[str]:
    """The class of each pipeline layer a model of `config` becomes, in order: what a JSON's
    "partition": "type:REGEX" is matched against (Embedding, Positions, Block or RotaryBlock, Norm,
    and Embedding again or Head for the output layer)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [spec.typename.__name__ for spec, _ in FAMILIES[config.model_type](model)]


def layer_parameters(model) -> list[int]:
    """Parameters of each pipeline layer of `model` (any device, meta included); a tied output layer
    counts the embedding again, as the last stage holds a copy."""
    def count(spec) -> int:
        return sum(p.numel() for arg in spec.module_args if isinstance(arg, nn.Module) for p in arg.parameters())

    return [count(spec) for spec, _ in FAMILIES[model.config.model_type](model)]


def stage_bounds(counts: list[int], stages: int, partition: str = "parameters") -> list[int]:
    """Where DeepSpeed cuts the layers into stages: parts[s] .. parts[s + 1] - 1 are stage s's."""
    from deepspeed.runtime import utils

    if partition == "uniform":
        return [int(b) for b in utils.partition_uniform(len(counts), stages)]
    return [int(b) for b in utils.partition_balanced(counts, stages)]


def bubble(stages: int, micro_batches: int) -> float:
    """The idle share of a 1F1B pipeline step: (P - 1) / (m + P - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def mean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The micro-batch's mean next-token loss (pretraining windows: every position is a target)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def to_pipeline(model, layout):
    """The model as a DeepSpeed PipelineModule holding this rank's stage of the layout's pipeline (a
    parallel.layout.Layout); the rest is dropped with `model`. `hf_names` holds the Hugging Face
    name of each layer's module (None for a tied head)."""
    from deepspeed.pipe import PipelineModule

    layers = FAMILIES[model.config.model_type](model)
    # DeepSpeed prints its seeds, topology and a layer listing here; the recipe's own "Pipeline:"
    # line says the split (GPT_RECIPES_VERBOSE=1 shows DeepSpeed's).
    with console.quiet_prints():
        module = PipelineModule([spec for spec, _ in layers], num_stages=layout.pipeline, loss_fn=mean_token_loss,
                                partition_method=layout.partition,
                                activation_checkpoint_interval=layout.activation_checkpoint_interval)
    module.hf_names = [name for _, name in layers]
    module.config = model.config
    return module


def is_pipeline(module) -> bool:
    from deepspeed.pipe import PipelineModule

    return isinstance(module, PipelineModule)


def describe(module) -> str:
    parts = module.parts
    return "Pipeline: " + ", ".join(f"stage {s}: layers {parts[s]}-{parts[s + 1] - 1}"
                                     for s in range(len(parts) - 1)) + f" of {parts[-1]} (embedding, blocks, norm, head)"


# --- The logits of a pipeline --------------------------------------------------------------------


@torch.no_grad()
def logits(engine, input_ids: torch.Tensor) -> torch.Tensor:
    """The pipeline's logits for input_ids on every rank (the last stage computes them)."""
    engine.reset_activation_shape()
    engine.total_loss = None  # eval_batch adds to what the last train_batch left
    _, out = engine.eval_batch(iter([(input_ids, torch.zeros_like(input_ids))]), return_logits=True,
                               compute_loss=False, num_micro_batches=1)
    engine.reset_activation_shape()
    engine.train()
    vocab = engine.module.config.vocab_size
    # On the engine's device: NCCL broadcasts no CPU tensors.
    result = (out.float().contiguous() if engine.is_last_stage()
              else torch.zeros(*input_ids.shape, vocab, device=engine.device))
    torch.distributed.broadcast(result, src=engine.grid.stage_to_global(engine.num_stages - 1,
                                                                          data=engine.grid.data_parallel_id),
                                group=engine.grid.get_pipe_parallel_group())
    return result


@dataclass
class LayerNames:
    """Saved with each checkpoint (as the model config is): the Hugging Face module each layer
    file holds, None for a tied output layer."""

    names: list[str | None]

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / LAYERS_FILE).write_text(json.dumps(self.names) + "\n")


def is_pipeline_checkpoint(tag_dir: Path) -> bool:
    return (tag_dir / LAYERS_FILE).is_file()


def hf_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's weights under the Hugging Face model's names, from its per-layer files
    (the module weights as trained: fp32 master weights in fp32 runs)."""
    names = json.loads((tag_dir / LAYERS_FILE).read_text())
    state = {}
    for index, prefix in enumerate(names):
        if prefix is None:  # a tied output layer: the embedding's weight, saved with layer 0
            continue
        files = sorted(tag_dir.glob(f"layer_{index:02d}-*model_states.pt"))
        if not files:
            raise UserError(f"checkpoint {tag_dir} lacks the file of pipeline layer {index} ({prefix})")
        layer = torch.load(files[0], map_location="cpu", weights_only=True)
        for key, tensor in layer.items():
            if key.startswith("module."):
                state[f"{prefix}.{key[len('module.'):]}"] = tensor.float()
    return state
