import json

import datasets
import numpy as np
import pytest

from gpt_recipes.data.prepare import PrepareOptions, prepare
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.data.tokens import read_meta
from gpt_recipes.errors import UserError

DOCS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.\n",
        "import os\nprint(os.getcwd())\n", "Data parallel training averages gradients.\n"] * 5


def _tokens(meta, split):
    return np.concatenate([np.fromfile(p, dtype=meta.dtype) for p in meta.split_files(split)])


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


# --- sharded preparation ------------------------------------------------------------------------

def _streams(folder) -> dict:
    meta = read_meta(folder)
    return {split: _tokens(meta, split) for split in ("train", "val")}


def _part_files(folder, index, num_shards):
    stem = f"{index:05d}-of-{num_shards:05d}"
    return [folder / f"part-{stem}.json", folder / f"train-{stem}.bin", folder / f"val-{stem}.bin"]


@pytest.fixture(scope="module")
def one_go(tmp_path_factory, corpus_files, tokenizer_dir):
    out = tmp_path_factory.mktemp("one_go") / "data"
    prepare(PrepareOptions(inputs=corpus_files, output=str(out), tokenizer=tokenizer_dir, val_fraction=0.1,
                           num_proc=1))
    return out


def test_parts_prepared_apart_and_gathered_read_as_the_one_go_stream(tmp_path, corpus_files, tokenizer_dir, one_go):
    import shutil

    machines = []
    for index in (2, 0, 1):  # each part on its own "machine" (folder), in any order
        machines.append(tmp_path / f"machine{index}")
        prepare(PrepareOptions(inputs=corpus_files, output=str(machines[-1]), tokenizer=tokenizer_dir,
                               val_fraction=0.1, num_proc=1, num_shards=3, shard_index=index))
    gathered = tmp_path / "gathered"
    shutil.copytree(machines[0], gathered)  # part 2 with the tokenizer
    with pytest.raises(UserError, match="holds 1 of its 3 parts; missing: 0, 1"):
        read_meta(gathered)
    for machine, index in zip(machines[1:], (0, 1)):
        for path in _part_files(machine, index, 3):
            shutil.copy(path, gathered)
    assert not (gathered / "meta.json").exists()  # the listing is the index
    sharded, whole = _streams(gathered), _streams(one_go)
    for split in ("train", "val"):
        assert np.array_equal(sharded[split], whole[split]), split
    meta = read_meta(gathered)
    assert len(meta.shards("train")) == 3 and meta.split_tokens("train") == len(whole["train"])
    assert read_meta(one_go).raw["splits"]["val"]["documents"] == meta.raw["splits"]["val"]["documents"] >= 1

    # A part of another preparation (another seed holds out other documents), copied in by mistake.
    stray = tmp_path / "stray"
    prepare(PrepareOptions(inputs=corpus_files, output=str(stray), tokenizer=tokenizer_dir, val_fraction=0.1,
                           seed=7, num_proc=1, num_shards=3, shard_index=1))
    for path in _part_files(stray, 1, 3):
        shutil.copy(path, gathered)
    with pytest.raises(UserError, match="comes from another preparation"):
        read_meta(gathered)


def test_an_interrupted_preparation_resumes_from_finished_parts(tmp_path, corpus_files, tokenizer_dir, one_go,
                                                                monkeypatch, capsys):
    from gpt_recipes.data import prepare as prepare_module

    write_part = prepare_module._write_part

    def stop_at_third_part(corpus, index, *args):
        if index == 2:
            raise KeyboardInterrupt
        return write_part(corpus, index, *args)

    out = tmp_path / "data"
    opts = PrepareOptions(inputs=corpus_files, output=str(out), tokenizer=tokenizer_dir, val_fraction=0.1,
                          num_proc=2, num_shards=4)
    monkeypatch.setattr(prepare_module, "_write_part", stop_at_third_part)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts)
    assert not out.exists()  # nothing that looks prepared
    partial, = tmp_path.glob(".data.partial-*")
    finished = {p: p.stat().st_mtime_ns for i in (0, 1) for p in _part_files(partial, i, 4)}
    monkeypatch.setattr(prepare_module, "_write_part", write_part)
    prepare(opts)
    log = capsys.readouterr().out
    assert "Part 1 of 4 is already prepared" in log and "Part 2 of 4 is already prepared" in log
    assert "Part 3 of 4 is already prepared" not in log
    assert {p.name: t for p, t in finished.items()} == {p.name: (out / p.name).stat().st_mtime_ns for p in finished}
    assert not partial.exists() and (out / "meta.json").is_file()
    resumed, whole = _streams(out), _streams(one_go)
    assert all(np.array_equal(resumed[s], whole[s]) for s in ("train", "val"))
    (out / "train-00001-of-00004.bin").unlink()
    with pytest.raises(UserError, match="missing train-00001-of-00004.bin"):
        read_meta(out)


def test_a_stream_in_parts_is_the_stream_in_one_go(tmp_path, tokenizer_dir):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": f"{d} ({i}, {j})"}) + "\n" for j, d in enumerate(DOCS)))
    common = dict(inputs=[str(f) for f in files], tokenizer=tokenizer_dir, streaming=True, val_fraction=0.2)
    prepare(PrepareOptions(output=str(tmp_path / "whole"), **common))
    for index in range(3):
        prepare(PrepareOptions(output=str(tmp_path / "parts"), num_shards=3, shard_index=index, **common))
    whole, parts = _streams(tmp_path / "whole"), _streams(tmp_path / "parts")
    assert all(np.array_equal(whole[s], parts[s]) for s in ("train", "val"))
    counts = read_meta(tmp_path / "parts").raw["splits"]
    assert counts["train"]["documents"] + counts["val"]["documents"] == 3 * len(DOCS)
    assert 0 < counts["val"]["documents"] < 0.5 * 3 * len(DOCS)
    with pytest.raises(UserError, match="the stream has 3 source file"):
        prepare(PrepareOptions(output=str(tmp_path / "too_many"), num_shards=4, **common))


@pytest.mark.parametrize("opts, match", [
    ({"shard_index": 0, "num_shards": 2}, "needs a fixed --tokenizer"),
    ({"streaming": True}, "needs a fixed --tokenizer"),
    ({"num_shards": 0}, "--num_shards must be at least 1"),
    ({"shard_index": 2, "num_shards": 2, "tokenizer": "t"}, r"--shard_index must lie in 0..1"),
])
def test_bad_shard_options(tmp_path, opts, match):
    with pytest.raises(UserError, match=match):
        prepare(PrepareOptions(inputs=[], output=str(tmp_path / "o"), **opts))


def test_a_part_never_lands_in_a_folder_of_other_files(tmp_path, corpus_files, tokenizer_dir, one_go):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    common = dict(inputs=corpus_files, tokenizer=tokenizer_dir, num_proc=1, num_shards=2, shard_index=0)
    with pytest.raises(UserError, match="holds other files"):
        prepare(PrepareOptions(output=str(other), **common))
    with pytest.raises(UserError, match="already a complete prepared folder"):
        prepare(PrepareOptions(output=str(one_go), **common))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_sharded_folder_trains_like_the_one_go_folder(tmp_path, corpus_files, tokenizer_dir, one_go, tiny_model):
    from tests.helpers import ds_json, read_metrics, run_python

    sharded = tmp_path / "data" / "sharded"
    for index in range(3):
        prepare(PrepareOptions(inputs=corpus_files, output=str(sharded), tokenizer=tokenizer_dir, val_fraction=0.1,
                               num_proc=1, num_shards=3, shard_index=index))
    cfg = ds_json(tmp_path, 1, 4, fp32=True)
    losses = {}
    for name, data in (("one_go", one_go), ("sharded", sharded)):
        proc = run_python("recipes/pretrain.py", ["--deepspeed_config", cfg, "--data", str(data), "--model",
                                                  str(tiny_model), "--output_dir", str(tmp_path / "runs" / name),
                                                  "--max_steps", "6", "--seq_len", "64", "--log_interval", "1",
                                                  "--eval_interval", "6"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        train, evals = read_metrics(tmp_path / "runs" / name)
        losses[name] = [r["loss"] for r in train] + [r["val_loss"] for r in evals]
    assert len(losses["one_go"]) > 6 and losses["one_go"] == losses["sharded"]


def test_a_binary_file_among_streamed_inputs_is_one_line(tmp_path, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOCS[0])
    (src / "b.pyc").write_bytes(b"\xa7\x0d\r\n" + bytes(range(256)))
    with pytest.raises(UserError, match="could not read the inputs: .*pick text files with --file_pattern"):
        prepare(PrepareOptions(inputs=[str(src)], output=str(tmp_path / "out"), tokenizer=tokenizer_dir))
    assert not (tmp_path / "out").exists()
