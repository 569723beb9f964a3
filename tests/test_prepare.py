import json

import datasets
import numpy as np
import pytest

from gpt_recipes.data import read_meta
from gpt_recipes.errors import UserError
from gpt_recipes.prepare import PrepareOptions, prepare
from gpt_recipes.tokenizer import load_tokenizer

DOCS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.\n",
        "import os\nprint(os.getcwd())\n", "Data parallel training averages gradients.\n"] * 5


def _tokens(meta, split):
    return np.fromfile(meta.split_path(split), dtype=meta.dtype)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_data):
    return str(tiny_data / "tokenizer")


def test_packed_stream_holds_every_document_once_with_eos(tiny_data, corpus_files):
    meta = read_meta(tiny_data)
    tok = load_tokenizer(meta.tokenizer_dir)
    assert meta.dtype == np.uint16 and meta.vocab_size == len(tok) == 1024
    docs = sum(meta.raw["splits"][s]["documents"] for s in ("train", "val"))
    assert docs == len(corpus_files)  # one document per file
    eos_count = sum(int((_tokens(meta, s) == tok.eos_token_id).sum()) for s in ("train", "val"))
    assert eos_count == docs
    val = _tokens(meta, "val")
    assert val[-1] == tok.eos_token_id
    first_doc = tok.decode(val[: int(np.argmax(val == tok.eos_token_id))].tolist())
    assert any(open(f).read() == first_doc for f in corpus_files)  # real text, decoded back exactly


def test_jsonl_parquet_and_saved_dataset_inputs(tmp_path, tokenizer_dir):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    ds = datasets.Dataset.from_dict({"body": DOCS})
    ds.to_parquet(str(tmp_path / "b.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    meta = prepare(PrepareOptions(inputs=[str(jsonl), str(tmp_path / "b.parquet"), str(tmp_path / "saved")],
                                  output=str(tmp_path / "out"), tokenizer=tokenizer_dir, text_field="body",
                                  val_fraction=0.1, num_proc=1))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 3 * len(DOCS)


def test_folder_and_glob_inputs(tmp_path, tokenizer_dir):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i, d in enumerate(DOCS[:8]):
        (src / ("sub" if i % 2 else "") / f"{i}.txt").write_text(d)
    (src / "skip.log").write_text("not this")
    meta = prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "o1"), tokenizer=tokenizer_dir,
                                  file_pattern="*.txt", num_proc=1))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 8
    meta = prepare(PrepareOptions(inputs=[str(src / "sub" / "*.txt")], output=str(tmp_path / "o2"),
                                  tokenizer=tokenizer_dir, num_proc=1))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 4


def test_rerun_reuses_and_other_inputs_never_clobber(tmp_path, tokenizer_dir, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(DOCS))
    b.write_text("".join(DOCS[:2]))
    out = tmp_path / "out"
    opts = PrepareOptions(inputs=[str(a), str(b)], output=str(out), tokenizer=tokenizer_dir, num_proc=1)
    prepare(opts)
    stamp = (out / "train.bin").stat().st_mtime_ns
    prepare(opts)
    assert "Reusing" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    other = PrepareOptions(inputs=[str(a)], output=str(out), tokenizer=tokenizer_dir, num_proc=1)
    with pytest.raises(UserError, match="already holds other data"):
        prepare(other)
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    other.overwrite = True
    prepare(other)
    assert read_meta(out).raw["sources"] == [str(a)]


def test_overwrite_never_replaces_a_folder_that_is_not_prepared_data(tmp_path, tokenizer_dir):
    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(DOCS))
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.safetensors").write_text("someone's model")
    opts = PrepareOptions(inputs=[str(src)], output=str(mine), tokenizer=tokenizer_dir, num_proc=1, overwrite=True)
    with pytest.raises(UserError, match="is not a prepared data folder written by these tools, so --overwrite"):
        prepare(opts)
    assert [p.name for p in mine.iterdir()] == ["weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_a_single_document_is_split_by_tokens(tmp_path, tokenizer_dir):
    src = tmp_path / "book.txt"
    src.write_text("\n".join(DOCS * 10))
    meta = prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "o"), tokenizer=tokenizer_dir,
                                  val_fraction=0.1))
    train, val = meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]
    assert val == round(0.1 * (train + val))


def test_trains_a_tokenizer_that_autotokenizer_loads(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("\n".join(DOCS * 20))
    other = tmp_path / "u.txt"
    other.write_text("more text " * 50)
    meta = prepare(PrepareOptions(inputs=[str(src), str(other)], output=str(tmp_path / "o"), vocab_size=300,
                                  num_proc=1))
    tok = load_tokenizer(tmp_path / "o" / "tokenizer")
    assert len(tok) == meta["vocab_size"] <= 300
    assert tok.decode(tok("return x + 1")["input_ids"]) == "return x + 1"


@pytest.mark.parametrize("setup, match", [
    (lambda d: [str(d / "missing.txt")], "does not exist"),
    (lambda d: [_write(d / "empty.txt", "")], "is empty"),
    (lambda d: [str(d / "nomatch-*.txt")], "matches no files"),
    (lambda d: [_jsonl(d, {"content": "x"})], "no field 'text'"),
])
def test_bad_inputs(tmp_path, tokenizer_dir, setup, match):
    with pytest.raises(UserError, match=match):
        prepare(PrepareOptions(inputs=setup(tmp_path), output=str(tmp_path / "out"), tokenizer=tokenizer_dir))
    assert not (tmp_path / "out").exists()


def _write(path, text):
    path.write_text(text)
    return str(path)


def _jsonl(d, row):
    path = d / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    return str(path)


def test_bad_tokenizer(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("\n".join(DOCS))
    with pytest.raises(UserError, match="could not load tokenizer"):
        prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "o"), tokenizer=str(tmp_path / "nothing")))


@pytest.mark.parametrize("opts, match", [
    ({"val_fraction": 1.5}, "--val_fraction must lie between 0 and 1"),
    ({"vocab_size": 100}, "--vocab_size 100 is too small"),
])
def test_bad_options(tmp_path, opts, match):
    src = tmp_path / "t.txt"
    src.write_text("\n".join(DOCS))
    with pytest.raises(UserError, match=match):
        prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "o"), **opts))
    assert not (tmp_path / "o").exists()
