"""The command-line tools, run as users run them."""

import json

import pytest
from transformers import AutoTokenizer

from tests.helpers import run_here, run_python

pytestmark = pytest.mark.slow  # each test starts Python processes that import the full stack


def test_train_tokenizer_then_prepare_with_it(tmp_path, corpus_files):
    tok_dir = tmp_path / "tok"
    proc = run_python("tools/train_tokenizer.py", [*corpus_files[:20], "--vocab_size", "600", "--output", str(tok_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Into a log, not a terminal: the trainer's progress bar (it leaves blank lines) stays off.
    assert proc.stdout.splitlines() == [f"Saved a byte-level BPE tokenizer with 600 tokens to {tok_dir}"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 600 and tok.eos_token == "<|endoftext|>"
    text = open(corpus_files[0]).read()
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless on real text

    out = tmp_path / "data"
    proc = run_python("tools/prepare_data.py", [*corpus_files[:20], "--tokenizer", str(tok_dir), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16"

    proc = run_python("tools/train_tokenizer.py", [corpus_files[0], "--output", str(tok_dir)])
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "not empty" in proc.stderr
    assert len(AutoTokenizer.from_pretrained(tok_dir)) == 600  # untouched
    # --overwrite replaces a tokenizer this tool wrote, whole (no file of the old one is left)...
    (tok_dir / "stale.txt").write_text("from the old tokenizer")
    proc = run_python("tools/train_tokenizer.py", [corpus_files[0], "--vocab_size", "500", "--output", str(tok_dir),
                                                   "--overwrite"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(AutoTokenizer.from_pretrained(tok_dir)) <= 500 and not (tok_dir / "stale.txt").exists()
    # ...but never a folder of anyone else's.
    proc = run_python("tools/train_tokenizer.py", [corpus_files[0], "--output", str(out), "--overwrite"])
    assert proc.returncode == 2 and "is not a tokenizer folder written by these tools" in proc.stderr
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 600


def test_prepare_data_bad_input_is_one_line(tmp_path):
    proc = run_here("tools/prepare_data.py", [str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: input {tmp_path / 'missing.jsonl'} does not exist"
