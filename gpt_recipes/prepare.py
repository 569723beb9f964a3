"""Turn raw text into a prepared data folder: tokenise once, pack, split, memory-map later.

Writing goes to a temporary folder that is renamed into place when complete, so an
interrupted run never leaves a folder that looks prepared, and an existing folder is
only replaced when the user asks (--overwrite) and it is a data folder prepared here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from . import folders, sources
from .data import META_FILE, TOKENIZER_DIR, read_meta, token_dtype
from .errors import UserError
from .tokenizer import check_vocab_size, load_tokenizer, text_batches, train_bpe

FORMAT_VERSION = 1
DATA_KIND = "prepared data"
DEFAULT_DATA_DIR = "data/stdlib"


@dataclass
class PrepareOptions:
    inputs: list[str]
    output: str
    tokenizer: str | None = None
    vocab_size: int = 8192
    val_fraction: float = 0.02
    seed: int = 1234
    text_field: str = "text"
    split: str = "train"
    file_pattern: str = "*"
    num_proc: int = 0
    overwrite: bool = False


def _encode_batch(batch: dict, tokenizer) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [seq + [eos] for seq in ids]
    return {"ids": ids, "length": [len(seq) for seq in ids]}


def _split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle documents once and hold out a fraction for validation (at least one document)."""
    order = np.random.default_rng(seed).permutation(num_docs)
    num_val = max(1, round(val_fraction * num_docs))
    return order[num_val:], order[:num_val]


def _document_chunks(tokenized, indices: np.ndarray, dtype: np.dtype) -> Iterator[np.ndarray]:
    for batch in tokenized.select(indices).iter(batch_size=1024):
        yield np.concatenate([np.asarray(seq, dtype=dtype) for seq in batch["ids"]])


def _split_streams(tokenized, val_fraction: float, seed: int, dtype: np.dtype) -> dict[str, tuple]:
    """{split: (token count, document count, chunk iterator)} for train and val.

    Several documents split by document; a single one (a book, one big file) by tokens,
    its last `val_fraction` held out.
    """
    lengths = np.asarray(tokenized["length"], dtype=np.int64)
    if len(lengths) == 1:
        ids = np.asarray(tokenized[0]["ids"], dtype=dtype)
        cut = len(ids) - max(2, round(val_fraction * len(ids)))
        if cut < 2:
            raise UserError(f"the input holds one document of {len(ids)} tokens: too little to split")
        return {"train": (cut, 1, iter([ids[:cut]])), "val": (len(ids) - cut, 1, iter([ids[cut:]]))}
    train_idx, val_idx = _split_documents(len(lengths), val_fraction, seed)
    return {split: (int(lengths[idx].sum()), len(idx), _document_chunks(tokenized, idx, dtype))
            for split, idx in (("train", train_idx), ("val", val_idx))}


def _write_split(chunks: Iterator[np.ndarray], total: int, path: Path, dtype: np.dtype, desc: str) -> None:
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(total,))
    pos = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc) as bar:
        for chunk in chunks:
            out[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
            bar.update(len(chunk))
    assert pos == total, f"wrote {pos} tokens, expected {total}"
    out.flush()
    del out


def _default_num_proc(num_docs: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, num_docs // 8 or 1))


def prepare(opts: PrepareOptions) -> dict:
    """Prepare (or reuse) a data folder; returns its metadata."""
    inputs = opts.inputs
    default_corpus = not inputs
    if default_corpus:
        inputs = [str(p) for p in sources.default_corpus_files()]
    if not 0 < opts.val_fraction < 1:
        raise UserError(f"--val_fraction must lie between 0 and 1, got {opts.val_fraction}")
    if opts.num_proc < 0:
        raise UserError(f"--num_proc must be 0 (one per core) or positive, got {opts.num_proc}")
    if not opts.tokenizer:
        check_vocab_size(opts.vocab_size)
    expanded = sources.expand(inputs, opts.file_pattern)
    out_dir = Path(opts.output)
    options = {
        "format": FORMAT_VERSION,
        "tokenizer": str(Path(opts.tokenizer).resolve()) if opts.tokenizer else f"bpe-{opts.vocab_size}",
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "text_field": opts.text_field,
        "split": opts.split,
    }
    digest = sources.fingerprint(expanded, options)

    if (out_dir / META_FILE).is_file():
        existing = json.loads((out_dir / META_FILE).read_text())
        if existing.get("fingerprint") == digest:
            read_meta(out_dir)  # still complete and intact
            print(f"Reusing prepared data in {out_dir} (same inputs and options)")
            return existing
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} exists and is not a folder")
    if not folders.is_empty(out_dir) and not opts.overwrite:
        raise UserError(
            f"output folder {out_dir} already holds other data; choose another --output or pass --overwrite"
        )
    folders.check_replaceable(out_dir, DATA_KIND, opts.overwrite, "--overwrite", owned=_is_data_folder(out_dir))

    texts = sources.load_texts(expanded, opts.text_field, opts.split)
    if opts.tokenizer:
        tokenizer = load_tokenizer(opts.tokenizer)
    else:
        print(f"Training a byte-level BPE tokenizer (vocabulary {opts.vocab_size}) on {len(texts)} documents")
        tokenizer = train_bpe(text_batches(texts), opts.vocab_size, length=len(texts))
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)

    num_proc = opts.num_proc or _default_num_proc(len(texts))
    tokenized = texts.map(
        _encode_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=texts.column_names,
        desc="Tokenizing",
    )
    streams = _split_streams(tokenized, opts.val_fraction, opts.seed, dtype)

    with folders.written_aside(out_dir, DATA_KIND) as tmp:
        counts = {}
        for split, (tokens, documents, chunks) in streams.items():
            _write_split(chunks, tokens, tmp / f"{split}.bin", dtype, f"Writing {split}")
            counts[split] = {"file": f"{split}.bin", "tokens": tokens, "documents": documents}
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        meta = {
            "format": FORMAT_VERSION,
            "fingerprint": digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sources": "python-stdlib" if default_corpus else inputs,
            "tokenizer": TOKENIZER_DIR,
            "tokenizer_source": opts.tokenizer or f"byte-level BPE trained here, vocabulary {opts.vocab_size}",
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "dtype": dtype.name,
            "documents_separated_by": "eos",
            "splits": counts,
            "options": options,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    summary = ", ".join(f"{s}: {c['tokens']:,} tokens in {c['documents']:,} documents" for s, c in counts.items())
    print(f"Prepared {out_dir} ({dtype.name}, vocabulary {vocab_size}; {summary})")
    return meta


def _is_data_folder(path: Path) -> bool:
    """A data folder this project prepared: marked, or (from before markers) a meta.json with our fingerprint."""
    if folders.written_here(path, DATA_KIND):
        return True
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "fingerprint" in meta and "splits" in meta


def ensure_default_data(data_dir: str) -> None:
    """Prepare the built-in default corpus on first use (other data is prepared explicitly).

    Every rank may call this at once: a file lock lets the first prepare while the
    others wait, then find the folder ready and reuse it.
    """
    path = Path(data_dir)
    if (path / META_FILE).is_file() or path.resolve() != Path(DEFAULT_DATA_DIR).resolve():
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / META_FILE).is_file():
            print(f"Preparing the default corpus in {path} (first use)", flush=True)
            prepare(PrepareOptions(inputs=[], output=str(path)))
