"""GPT-style causal LMs from `transformers` model classes: presets, config files, checks.

A model is named by a preset (below) or by a config JSON (a file, or a folder holding
config.json) with a `model_type` such as "gpt2" or "llama". The vocabulary size comes from
the tokenizer; pretraining presets have no dropout, so runs are deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gpt_recipes.errors import UserError, first_line

_GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}
_LLAMA_NO_DROPOUT = {"attention_dropout": 0.0, "mlp_bias": False, "attention_bias": False}


def _gpt2(layers: int, width: int, heads: int, context: int) -> dict[str, Any]:
    # "gelu_pytorch_tanh" is GPT-2's own tanh-approximated GELU ("gelu_new") computed by one
    # fused kernel instead of seven element-wise ones: same values, less time and memory.
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": context,
            "activation_function": "gelu_pytorch_tanh", **_GPT2_NO_DROPOUT}


def _llama(layers: int, width: int, heads: int, kv_heads: int, ffn: int, context: int, tied: bool) -> dict[str, Any]:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": width,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ffn,
            "max_position_embeddings": context, "tie_word_embeddings": tied, "rope_theta": 10000.0,
            **_LLAMA_NO_DROPOUT}


def _moe(model_type: str, layers: int, width: int, heads: int, experts: int, top_k: int, expert_ffn: int,
         context: int) -> dict[str, Any]:
    """A mixture-of-experts shape: each layer's MLP is `experts` experts of width `expert_ffn`, `top_k` per token."""
    fields = ({"num_local_experts": experts, "intermediate_size": expert_ffn} if model_type == "mixtral" else
              {"num_experts": experts, "moe_intermediate_size": expert_ffn, "intermediate_size": expert_ffn * top_k,
               "head_dim": width // heads, "decoder_sparse_step": 1})
    return {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": heads, "num_experts_per_tok": top_k, "max_position_embeddings": context,
            "tie_word_embeddings": True, "rope_theta": 10000.0, "attention_dropout": 0.0, **fields}


def _decoder(model_type: str, **extra: Any) -> dict[str, Any]:
    """llama-nano's shape in another decoder family (its own blocks: norms, rotary, MLP, biases)."""
    return {"model_type": model_type, "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 688, "max_position_embeddings": 256,
            "attention_dropout": 0.0, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    # Small shapes that train in minutes on a CPU.
    "gpt2-nano": _gpt2(4, 256, 4, 256),
    "gpt2-micro": _gpt2(6, 384, 6, 256),
    "llama-nano": _llama(4, 256, 4, 4, 688, 256, tied=True),
    "llama-micro": _llama(6, 384, 6, 6, 1024, 256, tied=True),
    # llama-nano with room for long sequences (rotary positions: no position table grows with it), for
    # sequence parallelism.
    "llama-nano-64k": _llama(4, 256, 4, 4, 688, 65536, tied=True),
    # Mixtures of experts with llama-nano's active parameters: 8 experts of a quarter of its MLP
    # width each, 2 per token (docs/parallelism_and_memory.md compares them).
    "mixtral-nano": _moe("mixtral", 4, 256, 4, 8, 2, 344, 256),
    "qwen3-moe-nano": _moe("qwen3_moe", 4, 256, 4, 8, 2, 344, 256),
    # One small shape per decoder family users fine-tune most.
    "qwen2-nano": _decoder("qwen2", tie_word_embeddings=True),
    "qwen3-nano": _decoder("qwen3", head_dim=64, tie_word_embeddings=True),
    "mistral-nano": _decoder("mistral", tie_word_embeddings=False),
    "gemma3-nano": _decoder("gemma3_text", head_dim=64, tie_word_embeddings=True),
    "phi3-nano": _decoder("phi3", tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0),
    "olmo2-nano": _decoder("olmo2", tie_word_embeddings=False),
    # The GPT-2 family's published shapes (124M, 350M, 774M, 1.5B with the GPT-2 vocabulary).
    "gpt2": _gpt2(12, 768, 12, 1024),
    "gpt2-medium": _gpt2(24, 1024, 16, 1024),
    "gpt2-large": _gpt2(36, 1280, 20, 1024),
    "gpt2-xl": _gpt2(48, 1600, 25, 1024),
    # Llama-family shapes at GPT-2-like sizes, and Llama 3.2 1B's shape.
    "llama-125m": _llama(12, 768, 12, 12, 2048, 1024, tied=True),
    "llama-350m": _llama(24, 1024, 16, 16, 2816, 1024, tied=True),
    "llama-1b": _llama(16, 2048, 32, 8, 8192, 2048, tied=True),
}


def _read_config_file(spec: str) -> dict[str, Any]:
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(
            f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config JSON file or folder"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"model config {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"model config {path} needs a \"model_type\" (e.g. \"gpt2\" or \"llama\")")
    return raw


def build_config(spec: str, vocab_size: int, eos_token_id: int) -> PretrainedConfig:
    """A model config from a preset or JSON, sized for the tokenizer's vocabulary."""
    raw = dict(PRESETS[spec]) if spec in PRESETS else _read_config_file(spec)
    model_type = raw.pop("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"model_type {model_type!r} in {spec} is not a causal LM known to transformers")
    declared = raw.get("vocab_size")
    if declared is not None and declared < vocab_size:
        raise UserError(
            f"the tokenizer's vocabulary ({vocab_size}) exceeds the model's vocab_size ({declared}) in {spec}; "
            "raise vocab_size or drop it to take the tokenizer's"
        )
    raw["vocab_size"] = declared or vocab_size
    raw.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None)
    _check_field_names(model_type, raw, spec)
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except Exception as err:  # transformers' strict config fields raise their own validation errors
        raise UserError(f"model config {spec} is not a valid {model_type} config: {' '.join(str(err).split())}")
    config._attn_implementation = "sdpa"
    check_causal(config, spec)
    _check_buildable(config, spec)
    return config


def _check_field_names(model_type: str, raw: dict[str, Any], spec: str) -> None:
    """A misspelt field (n_layers for n_layer) would silently leave the default in place."""
    import difflib

    config_class = type(AutoConfig.for_model(model_type))
    known = {*config_class().to_dict(), *getattr(config_class, "attribute_map", {})}
    for key in raw:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if key not in known and close:
            raise UserError(f"model config {spec}: {model_type} has no field {key!r}; did you mean {close[0]!r}?")


def check_causal(config: PretrainedConfig, where: str) -> None:
    """Refuse encoder families (BERT, RoBERTa, ...) that transformers maps to a causal-LM head but
    that attend to future tokens unless configured as decoders: they would train without a word
    on a task they can cheat at."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise UserError(f"{where} is a {config.model_type!r} model, which attends to future tokens unless "
                        "\"is_decoder\" is true; set it, or use a decoder-only model type such as gpt2 or llama")


def _check_buildable(config: PretrainedConfig, spec: str) -> None:
    """Build the model on the meta device (no memory) so shape errors surface before any rank starts."""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:
        raise UserError(f"model config {spec} has {layers} layers; a model needs at least one")
    try:
        with torch.device("meta"):
            causal_lm_class(config)._from_config(config, attn_implementation="sdpa")
    except Exception as err:
        raise UserError(f"model config {spec} does not build a model: {first_line(err)}")


def context_length(config: PretrainedConfig) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UserError(f"cannot tell the context length of a {config.model_type} config")


def check_seq_len(config: PretrainedConfig, seq_len: int | None) -> int:
    """The sequence length to train at: --seq_len, or the model's context length by default."""
    limit = context_length(config)
    if seq_len is None:
        return limit
    if seq_len < 1:
        raise UserError(f"--seq_len must be positive, got {seq_len}")
    if seq_len > limit:
        raise UserError(f"--seq_len {seq_len} exceeds the model's {limit} positions; lower it or use a longer-context model")
    return seq_len


def is_zero3(ds_cfg: dict[str, Any] | None) -> bool:
    return ds_cfg is not None and (ds_cfg.get("zero_optimization") or {}).get("stage") == 3


@contextlib.contextmanager
def partitioned_construction(ds_cfg: dict[str, Any] | None):
    """Under ZeRO-3, build models partitioned from the start: no rank ever holds a full copy.

    A transformers HfDeepSpeedConfig kept alive makes from_config/from_pretrained construct
    the model inside deepspeed.zero.Init: each parameter is partitioned as soon as its module
    is built, and random initialisation runs module by module on gathered parameters (on
    rank 0, then broadcast). It is dropped afterwards, so later model construction (the
    export check) is ordinary again. Outside ZeRO-3 this does nothing.
    """
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_cfg) if is_zero3(ds_cfg) else None
    try:
        yield
    finally:
        del keep


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    # Resolved (and its module imported) before zero.Init is entered: importing model
    # modules inside zero.Init fails with this torch.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def build_model(config: PretrainedConfig, ds_cfg: dict[str, Any] | None = None,
                device: str | torch.device | None = None) -> PreTrainedModel:
    """Randomly initialised model in fp32 (the engine casts to the config's precision);
    partitioned across ranks from the start when ds_cfg is a ZeRO-3 config.

    For a given seed the weights are the same at every ZeRO stage and number of ranks.
    Partitioned, transformers builds the modules with torch's per-layer initialisers
    switched off and then runs the model's own `_init_weights` module by module (children
    first) on gathered parameters. Unpartitioned, it would run torch's initialisers first,
    drawing other random numbers. So the unpartitioned build follows the partitioned one's
    steps: the same draws in the same order give bit-identical weights.

    The draws must also come from the same generator: zero.Init gathers parameters on the
    accelerator, so on a GPU they are CUDA draws. The unpartitioned build therefore runs on
    `device`, by default (with a DeepSpeed config) the accelerator DeepSpeed trains on.
    """
    from transformers import initialization

    model_class = causal_lm_class(config)
    if is_zero3(ds_cfg):
        with partitioned_construction(ds_cfg):
            return model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if device is None and ds_cfg is not None:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
    with initialization.no_init_weights(), torch.device(device) if device else contextlib.nullcontext():
        model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.initialize_weights()
    model.tie_weights()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    # Under ZeRO-3 a parameter's full size is in ds_numel; its local tensor is a shard.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def describe_presets() -> str:
    lines, width = [], max(map(len, PRESETS))
    for name, raw in PRESETS.items():
        config = build_config(name, vocab_size=8192, eos_token_id=0)
        with torch.device("meta"):
            params = count_parameters(AutoModelForCausalLM.from_config(config))
        lines.append(f"{name:{width}s}  {raw['model_type']:6s} {params / 1e6:8.1f}M parameters at vocabulary 8192, "
                     f"context {context_length(config)}")
    return "\n".join(lines)


def load_pretrained_config(name_or_path: str) -> PretrainedConfig:
    """The config of a Hugging Face model folder (or hub name), which must be a causal LM."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"{name_or_path} is not a Hugging Face model folder (no config.json)")
    # A hub name is NAME or ORG/NAME; a missing path that cannot be one, or whose first folder is
    # here, is a local folder mistyped: say so rather than ask a hub for it.
    if not path.exists() and (name_or_path.startswith((".", "/")) or len(path.parts) > 2
                              or len(path.parts) == 2 and Path(path.parts[0]).is_dir()):
        raise UserError(f"model folder {name_or_path} does not exist")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as err:
        raise UserError(f"could not load the model config of {name_or_path}: {first_line(err)}")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{name_or_path} holds a {config.model_type!r} model, which is not a causal LM")
    check_causal(config, name_or_path)
    return config


def check_weights_fit(folder: str | Path, config: PretrainedConfig) -> None:
    """Every tensor in the folder's safetensors files has the shape the config gives it (read from
    the files' headers against the model built on the meta device): a config.json edited to
    another vocabulary or width is one line here, not a size-mismatch traceback on every rank."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in causal_lm_class(config)._from_config(config).state_dict().items()}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    stored = tuple(f.get_slice(key).get_shape())
                    if key in shapes and shapes[key] != stored:
                        raise UserError(f"{file} holds {key} of shape {list(stored)}, but {Path(folder) / 'config.json'} "
                                        f"makes it {list(shapes[key])}; the config does not belong to these weights "
                                        "(an edited vocab_size or width?)")
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{file} is not a readable safetensors file ({first_line(err)}); is it truncated?")


def load_pretrained(name_or_path: str, config: PretrainedConfig, ds_cfg: dict[str, Any]) -> PreTrainedModel:
    """Pretrained weights in fp32 (the engine keeps fp32 master weights and casts the model);
    under ZeRO-3 each rank materialises only its own partition of every parameter."""
    model_class = causal_lm_class(config)
    with partitioned_construction(ds_cfg):
        return model_class.from_pretrained(name_or_path, config=config, dtype=torch.float32,
                                           attn_implementation="sdpa")


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward pass instead of storing them:
    activation memory drops to about one block's worth, at the price of a second forward."""
    # The non-reentrant variant works with ZeRO-3's parameter hooks and inputs that need no grad.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_tokenizer_fits(tokenizer, config: PretrainedConfig, where: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer in {where} has {len(tokenizer)} tokens but the model only "
                        f"{config.vocab_size} embeddings: they do not belong together")
