import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the launch helper module

from launch import ds_json, launch, pretrain_args  # noqa: E402

from gpt_recipes.data.prepare import PrepareOptions, prepare  # noqa: E402
from gpt_recipes.data.sft_demo import build  # noqa: E402
from gpt_recipes.data.sources import default_corpus_files  # noqa: E402

# A tiny GPT-2 so multi-rank runs take seconds: real text, real tokenizer, real engine.
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 176, "max_position_embeddings": 64,
              "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def corpus_files() -> list[str]:
    """A slice of the default corpus (the standard library's source): ~1 MB of real text."""
    files = [p for p in default_corpus_files() if p.parent.name in ("json", "email", "http", "logging", "asyncio")]
    assert files, "standard library source not found"
    return [str(p) for p in files]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_files) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareOptions(inputs=corpus_files, output=str(out), vocab_size=1024, val_fraction=0.1, num_proc=1))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny_gpt2.json"
    path.write_text(json.dumps(TINY_GPT2))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, tiny_data):
    """A tiny GPT-2 pretrained on 2 ranks and exported with --export_hf (context 128)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    model = tmp / "model.json"
    model.write_text(json.dumps({**TINY_GPT2, "n_positions": 128}))
    launch("recipes/pretrain.py", pretrain_args(ds_json(tmp, 2, micro=4), tiny_data, model, tmp / "run", 40,
                                                "--seq_len", "64", "--eval_interval", "0",
                                                "--export_hf", str(tmp / "hf")))
    return tmp / "hf"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_demo")
    counts = build(out)
    assert counts["train"] > 1000 and counts["val"] >= 300
    return out
