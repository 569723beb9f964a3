import json

import numpy as np
import pytest
import torch

from gpt_recipes.data import sft
from gpt_recipes.data.sft import (
    IGNORE,
    SFTSamples,
    encode,
    ensure_chat_template,
    fit_length,
    load_rows,
    pack,
    to_messages,
)
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import UserError
from gpt_recipes.models.causal_lm import build_config, build_model, load_pretrained_config
from gpt_recipes.models.loss import lm_loss

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
        {"role": "user", "content": "And json.loads?"},
        {"role": "assistant", "content": "Deserialize a str to a Python object."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    tok = load_tokenizer(tiny_data / "tokenizer")
    ensure_chat_template(tok)
    return tok


def test_only_assistant_tokens_are_labelled(tokenizer):
    ex = encode(tokenizer, CHAT, "test")
    answers = [m["content"] + tokenizer.eos_token for m in CHAT if m["role"] == "assistant"]
    assert tokenizer.decode(ex.ids[ex.is_response].tolist()) == "".join(answers)
    # the prompt the model sees at generation time is exactly the unlabelled prefix
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    first_answer = int(np.argmax(ex.is_response))
    assert ex.ids[:first_answer].tolist() == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_pairs_are_single_turn_chats(tokenizer):
    pair = to_messages({"prompt": "Say hi.", "response": "hi"}, "x")
    assert pair == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def _model(family="gpt2-nano", vocab=1024):
    torch.manual_seed(0)
    return build_model(build_config(family, vocab, 0)).eval()


def test_loss_is_the_mean_over_response_tokens_only(tokenizer):
    """The batch's loss equals a hand computation from the model's log-probabilities at each
    example's response positions alone: prompt tokens contribute nothing, every response token
    (the first one's prediction comes from the last prompt token) contributes once."""
    pair = to_messages({"prompt": "p q r", "response": "s t"}, "b")
    examples = [encode(tokenizer, CHAT, "a"), encode(tokenizer, pair, "b")]
    samples = SFTSamples([[e] for e in examples], tokenizer.eos_token_id, packed=False)
    inputs, targets = samples.batch(np.arange(2))
    model = _model()
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
    nll = [-logp[row, t - 1, int(e.ids[t])] for row, e in enumerate(examples)
           for t in range(1, len(e.ids)) if e.is_response[t]]
    assert len(nll) == sum(int(e.is_response[1:].sum()) for e in examples) > 0
    assert any(not e.is_response[1:].all() for e in examples)  # there are prompt tokens to leave out
    assert lm_loss(logp, targets).item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-6)
    # The same mean taken over every position (prompt labels left in) is another number.
    every = [-logp[row, t - 1, int(e.ids[t])] for row, e in enumerate(examples) for t in range(1, len(e.ids))]
    assert abs(torch.stack(every).mean().item() - torch.stack(nll).mean().item()) > 1e-3


@pytest.mark.parametrize("family", ["gpt2-nano", "llama-nano"])
def test_packed_examples_give_the_same_per_example_loss(tokenizer, family):
    rng = np.random.default_rng(0)
    rows = [{"prompt": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], n)), "response": f"answer {n}"}
            for n in (3, 11, 6, 2, 8)]
    examples = [encode(tokenizer, to_messages(r, "t"), "t") for r in rows]
    unpacked = SFTSamples([[e] for e in examples], tokenizer.eos_token_id, packed=False)
    packed_rows = pack(examples, seq_len=200)
    assert len(packed_rows) < len(examples)
    packed = SFTSamples(packed_rows, tokenizer.eos_token_id, packed=True)
    model = _model(family)

    def per_example(samples, control=False):
        inputs, targets = samples.batch(np.arange(len(samples)))
        if control:  # plain causal attention over the packed row: what packing must avoid
            inputs = {"input_ids": inputs["input_ids"]}
        with torch.no_grad():
            token_loss = torch.nn.functional.cross_entropy(model(**inputs).logits.flatten(0, 1), targets.flatten(),
                                                           ignore_index=IGNORE, reduction="none").view(targets.shape)
        losses = []
        for b, row in enumerate(samples.rows):
            pos = 0
            for ex in row:
                n = len(ex.ids) - 1
                losses.append(token_loss[b, pos:pos + n].sum().item())
                pos += n
        return np.array(losses)

    reference = per_example(unpacked)
    assert np.abs(per_example(packed) - reference).max() < 1e-4  # fp32 rounding
    assert np.abs(per_example(packed, control=True) - reference).max() > 1e-2


def test_length_policy(tokenizer):
    short = encode(tokenizer, to_messages({"prompt": "a", "response": "b"}, "s"), "s")
    long = encode(tokenizer, to_messages({"prompt": "x " * 40, "response": "y " * 40}, "l"), "l")
    kept, report = fit_length([short, long], 30, truncate=False)
    assert len(kept) == 1 and (report.dropped, report.truncated) == (1, 0)
    kept, report = fit_length([short, long], len(long.ids) - 5, truncate=True)
    assert len(kept) == 2 and (report.dropped, report.truncated) == (0, 1) and kept[1].is_response.any()
    prompt_only_fits = int(np.argmax(long.is_response))
    kept, report = fit_length([long], prompt_only_fits, truncate=True)
    assert not kept and report.dropped == 1  # no response token would remain


@pytest.mark.parametrize("row, match", [
    ({"prompt": "q"}, "row 3: needs 'messages', or 'prompt' and 'response' \\(missing response\\)"),
    ({"prompt": "q", "response": "  "}, "row 3: empty response"),
    ({"messages": [{"role": "user", "content": "q"}]}, "row 3: no assistant message"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "row 3: message 0 has role 'bot'"),
    ({"messages": [{"role": "user"}]}, "row 3: message 0 needs 'role' and 'content'"),
    ({"messages": []}, "row 3: 'messages' must be a non-empty list"),
    ({"prompt": 123, "response": "x"}, "row 3: 'prompt' must be text, not 123"),
    ({"prompt": "q", "response": ["a"]}, "row 3: 'response' must be text, not \\[\"a\"\\]"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     "row 3: message 0 content must be text"),
    ({"messages": "hello"}, "row 3: 'messages' must be a non-empty list"),
])
def test_bad_rows_name_file_and_row(row, match):
    with pytest.raises(UserError, match=match):
        to_messages(row, "data.jsonl row 3")


def test_chat_template_that_fails_to_render(tiny_data):
    tok = load_tokenizer(tiny_data / "tokenizer")
    tok.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(UserError, match="data.jsonl row 1: the chat template failed to render: no system role"):
        encode(tok, CHAT, "data.jsonl row 1")


def test_model_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UserError, match="holds a 'vit' model, which is not a causal LM"):
        load_pretrained_config(str(tmp_path))
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_pretrained_config(str(tmp_path / ".."))


def test_load_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert load_rows(path) == [{"prompt": "a", "response": "b"}]
    with pytest.raises(UserError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, text, match", [
    ("empty.jsonl", "", "holds no rows"),
    ("notes.txt", "hello", "expected a .jsonl, .json, .parquet file or a datasets folder"),
    ("broken.jsonl", "{not json}\n", "JSON parse error: .* \\(each row must be a JSON object\\)"),
    ("strings.jsonl", '"just text"\n', "JSON parse error"),
])
def test_data_files_that_are_not_rows(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_rows(path)


@pytest.mark.parametrize("packed", [False, True])
def test_padding_to_a_multiple_changes_shapes_not_the_loss(tokenizer, packed):
    pair = to_messages({"prompt": "p q r", "response": "s t"}, "b")
    examples = [encode(tokenizer, CHAT, "a"), encode(tokenizer, pair, "b")]
    rows = [examples] if packed else [[e] for e in examples]
    exact = SFTSamples(rows, tokenizer.eos_token_id, packed=packed)
    model = _model()
    inputs, targets = exact.batch(np.arange(len(rows)))
    width = targets.shape[1]
    with torch.no_grad():
        expected = lm_loss(model(**inputs).logits, targets)
    for multiple, cap, wanted in ((16, None, -(-width // 16) * 16), (64, width + 3, width + 3)):
        padded = SFTSamples(rows, tokenizer.eos_token_id, packed=packed, pad_multiple=multiple, max_width=cap)
        p_inputs, p_targets = padded.batch(np.arange(len(rows)))
        assert p_targets.shape[1] == wanted > width
        assert padded.num_tokens(np.arange(len(rows))) == exact.num_tokens(np.arange(len(rows)))
        with torch.no_grad():
            assert lm_loss(model(**p_inputs).logits, p_targets).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("content, match", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d\xff"}\n', "line 2 is not UTF-8 text \\(byte 0xff\\)"),
    (b'{"prompt": "a", "response": "caf\xc3', "ends inside a UTF-8 character"),
])
def test_rows_that_are_not_utf8_name_the_line(tmp_path, content, match):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_rows(path)


def test_each_file_of_a_mixture_holds_out_its_own_rows(tmp_path):
    from gpt_recipes.data.mixture import MixtureOrder
    from gpt_recipes.ds_config import BatchPlan

    for name, n in (("a", 40), ("b", 10)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{name}{i}", "response": "r"}) + "\n" for i in range(n)))
    paths = [str(tmp_path / "a" / "train.jsonl"), str(tmp_path / "b" / "train.jsonl")]
    sources = sft.read_sources(paths, [], 0.1)
    assert [s.name for s in sources] == ["a/train", "b/train"]  # one stem: the folder tells them apart
    assert [(len(s.train), len(s.val)) for s in sources] == [(36, 4), (9, 1)]
    assert sources[1].val[0][1]["prompt"] == "b0" and sources[1].train[0][1]["prompt"] == "b1"
    with pytest.raises(UserError, match="--val_data gives 1 files for 2 --data files"):
        sft.read_sources(paths, [paths[0]], 0.1)
    with pytest.raises(UserError, match="two sources would share the name 'a/train'"):
        sft.source_names([paths[0], paths[0].replace(".jsonl", ".parquet")])

    parts = [sft.SFTSamples([[sft.Example(np.arange(k + 3), np.ones(k + 3, bool))] for k in range(len(s.train))],
                            0, packed=False) for s in sources]
    mixed = sft.MixedSFT(parts, [s.name for s in sources])
    assert len(mixed) == 45 and mixed.source_of(35) == 0 and mixed.source_of(36) == 1
    inputs, _ = mixed.batch(np.array([36]))  # the second source's first example, as its own set has it
    assert torch.equal(inputs["input_ids"], parts[1].batch(np.array([0]))[0]["input_ids"])
    order = MixtureOrder(mixed, [0.5, 0.5], BatchPlan(4, 1, 1), seed=0)
    batch = order.global_batch(0)
    assert sorted(mixed.source_of(i) for i in batch) == [0, 0, 1, 1]
    assert order.source_counts(3) == {"source_samples": {"a/train": 6, "b/train": 6}}
