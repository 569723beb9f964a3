import json

import pytest
import torch

from gpt_recipes.errors import UserError
from gpt_recipes.models.causal_lm import PRESETS, build_config, build_model, check_seq_len, context_length


@pytest.mark.parametrize("name", ["gpt2-nano", "llama-nano"])
def test_presets_take_the_tokenizers_vocabulary_and_have_no_dropout(name):
    config = build_config(name, vocab_size=1000, eos_token_id=7)
    assert config.vocab_size == 1000 and config.eos_token_id == 7
    assert config._attn_implementation == "sdpa"
    dropouts = {k: v for k, v in config.to_dict().items() if "drop" in k and isinstance(v, float)}
    assert dropouts and all(v == 0.0 for v in dropouts.values())
    model = build_model(config)
    assert model.get_input_embeddings().weight.shape[0] == 1000
    # deterministic given the seed: two builds under the same seed are identical
    torch.manual_seed(0)
    a = build_model(config).state_dict()
    torch.manual_seed(0)
    b = build_model(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_family_the_tests_run_has_a_preset():
    assert {raw["model_type"] for raw in PRESETS.values()} == {"gpt2", "llama", "mixtral", "qwen3_moe", "qwen2", "qwen3",
                                                               "mistral", "gemma3_text", "phi3", "olmo2"}
    for name in PRESETS:  # each builds
        build_config(name, 1024, 0)


def test_config_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 32,
                                "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}))
    config = build_config(str(path), vocab_size=500, eos_token_id=0)
    assert config.model_type == "llama" and config.vocab_size == 500 and context_length(config) == 128
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(path.read_text())
    assert build_config(str(folder), 500, 0).hidden_size == 32


def test_larger_declared_vocabulary_is_kept(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 512}))
    assert build_config(str(path), vocab_size=500, eos_token_id=0).vocab_size == 512


@pytest.mark.parametrize("content, match", [
    ({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 100}, "exceeds the model's vocab_size"),
    ({"n_layer": 1}, "needs a \"model_type\""),
    ({"model_type": "vit"}, "not a causal LM"),
    ("{not json", "not valid JSON"),
    ({"model_type": "gpt2", "n_layer": 1, "n_embd": 30, "n_head": 4}, "does not build a model: `embed_dim` must be divisible"),
    ({"model_type": "gpt2", "n_layer": 1, "n_embd": -32, "n_head": 2}, "does not build a model: .*negative dimension"),
    ({"model_type": "gpt2", "n_layer": 0, "n_embd": 32, "n_head": 2}, "has 0 layers; a model needs at least one"),
    ({"model_type": "gpt2", "n_layer": "two", "n_embd": 32, "n_head": 2},
     "is not a valid gpt2 config: .*'n_layer' expected int, got str"),
    ({"model_type": "gpt2", "n_layers": 1, "n_embd": 32, "n_head": 2}, "has no field 'n_layers'; did you mean 'n_layer'"),
    ({"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
      "intermediate_size": 64}, "'bert' model, which attends to future tokens unless \"is_decoder\" is true"),
])
def test_bad_model_configs(tmp_path, content, match):
    path = tmp_path / "m.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=match):
        build_config(str(path), vocab_size=500, eos_token_id=0)


def test_unknown_model():
    with pytest.raises(UserError, match="neither a preset"):
        build_config("gpt5-giant", 500, 0)


def test_seq_len_defaults_to_context_and_is_bounded():
    config = build_config("gpt2-nano", 500, 0)
    assert check_seq_len(config, None) == 256
    assert check_seq_len(config, 128) == 128
    with pytest.raises(UserError, match="exceeds the model's 256 positions"):
        check_seq_len(config, 257)


def test_tokenizer_larger_than_the_model_is_refused():
    from gpt_recipes.models.causal_lm import check_tokenizer_fits

    class Tok:
        def __len__(self):
            return 600

    with pytest.raises(UserError, match="has 600 tokens but the model only 500 embeddings"):
        check_tokenizer_fits(Tok(), build_config("gpt2-nano", 500, 0), "some/model")


def test_a_bert_configured_as_a_decoder_is_accepted(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "is_decoder": True,
                                "num_attention_heads": 2, "intermediate_size": 64}))
    assert build_config(str(path), 500, 0).is_decoder
