"""Turn raw text into a prepared data folder: tokenise once, pack, split, memory-map later.

A prepared folder holds each split in N shards. Part i of N holds the documents
[i*D/N, (i+1)*D/N) of the D input documents, in order, and whether a document is held
out for validation does not depend on N, so the shards concatenated are the same token
stream for any N. Each part can therefore be prepared alone (--shard_index i), on
several machines at once, and the parts gathered by copying them into one folder:

    meta.json                       the index (shards and token counts), once all parts are there
    tokenizer/
    part-00002-of-00004.json        a finished part's manifest, written after its token files
    train-00002-of-00004.bin, val-00002-of-00004.bin (train.bin, val.bin when N is 1)

Without --shard_index the parts are prepared in turn into `.NAME.partial-FINGERPRINT`
beside the output and renamed into place when all are done; a run that stops keeps its
finished parts, and the same command resumes from them. Memory stays flat in the corpus
size: documents go through in batches, and token files are appended to, never held.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from gpt_recipes import folders
from gpt_recipes.data import sources
from gpt_recipes.data import tokenizer as tokenizers
from gpt_recipes.data.tokenizer import check_vocab_size, load_tokenizer, text_batches, train_bpe
from gpt_recipes.data.tokens import (
    META_FILE,
    SPLITS,
    TOKENIZER_DIR,
    index_from_parts,
    part_name,
    read_meta,
    read_parts,
    token_dtype,
)
from gpt_recipes.errors import UserError

if TYPE_CHECKING:  # `datasets` takes about a second to import: only the functions that read data do
    import datasets

FORMAT_VERSION = 2
DATA_KIND = "prepared data"
DEFAULT_DATA_DIR = "data/stdlib"
BATCH_DOCUMENTS = 64


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
    num_shards: int = 1
    shard_index: int | None = None
    streaming: bool = False
    overwrite: bool = False


# --- which documents are held out -------------------------------------------------------------

def _val_documents(num_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the round(val_fraction * D) documents (at least one) held out: those
    whose seeded hash of their index is smallest. Chunked, so memory is that of the answer."""
    count = max(1, round(val_fraction * num_docs))
    chosen = np.empty(0, np.uint64)
    key = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    for start in range(0, num_docs, 1 << 22):
        idx = np.arange(start, min(num_docs, start + (1 << 22)), dtype=np.uint64)
        keys = _mix(idx ^ key)
        merged = np.concatenate([chosen, (keys & ~np.uint64(0xFFFFFFFF)) | idx])  # hash high bits, index low bits
        chosen = np.partition(merged, count - 1)[:count] if len(merged) > count else merged
    return np.sort((chosen & np.uint64(0xFFFFFFFF)).astype(np.int64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread hash of 64-bit integers."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _held_out_by_content(texts: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """For a stream, whose length is unknown: a document is held out when a seeded hash of its
    text falls below val_fraction (so duplicates land on the same side)."""
    key = seed.to_bytes(8, "little", signed=True)
    cut = int(val_fraction * 2**64)
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8, key=key).digest(), "little") < cut
                     for t in texts], dtype=bool)


# --- tokenising in batches, in worker processes ------------------------------------------------

_WORKER_TOKENIZER = None


def _set_worker_tokenizer(tok) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok


def _encode(texts: list[str], tok=None) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids, each followed by EOS, concatenated, and each one's length. int32
    (not int64) halves what workers send back."""
    tok = tok or _WORKER_TOKENIZER
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # the Rust batch call, without the Python wrapper's extra outputs
        ids = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
    flat = np.empty(int(lengths.sum()), np.int32)
    ends = np.cumsum(lengths) - 1
    body = np.ones(len(flat), bool)
    body[ends] = False
    flat[body] = np.fromiter(chain.from_iterable(ids), np.int32, len(flat) - len(ids))
    flat[ends] = tok.eos_token_id
    return flat, lengths


def _encoded(batches: Iterator[tuple[list[str], np.ndarray]], tok, num_proc: int) -> Iterator[tuple]:
    """(ids, lengths, held_out) per batch, in order, while the next batches are read. One
    process encodes on a thread (the tokenizer's own threads share the batch); more fork
    workers. A few batches are in flight per worker, never the whole corpus."""
    if num_proc == 1:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        submit = functools.partial(pool.submit, _encode, tok=tok)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
        context = multiprocessing.get_context("fork")
        pool = concurrent.futures.ProcessPoolExecutor(num_proc, context, _set_worker_tokenizer, (tok,))
        submit = functools.partial(pool.submit, _encode)
    with pool:
        pending: deque = deque()
        for texts, held_out in batches:
            pending.append((submit(texts), held_out))
            if len(pending) > 2 * num_proc:
                result, held = pending.popleft()
                yield (*result.result(), held)
        while pending:
            result, held = pending.popleft()
            yield (*result.result(), held)


# --- one part ----------------------------------------------------------------------------------

@dataclass
class _Corpus:
    texts: datasets.Dataset | datasets.IterableDataset
    num_docs: int | None  # None for a stream
    val_docs: np.ndarray | None  # sorted held-out document indices; None for a stream

    def part_range(self, index: int, num_shards: int) -> tuple[int, int]:
        return index * self.num_docs // num_shards, (index + 1) * self.num_docs // num_shards

    def batches(self, index: int, num_shards: int, opts: PrepareOptions) -> Iterator[tuple[list[str], np.ndarray]]:
        if self.num_docs is None:
            for batch in sources.read_batches(self.texts.shard(num_shards, index, contiguous=True), BATCH_DOCUMENTS):
                yield batch["text"], _held_out_by_content(batch["text"], opts.val_fraction, opts.seed)
            return
        lo, hi = self.part_range(index, num_shards)
        start = lo
        for batch in sources.read_batches(self.texts.skip(lo).take(hi - lo), BATCH_DOCUMENTS):
            stop = start + len(batch["text"])
            held = np.zeros(stop - start, bool)
            held[self.val_docs[np.searchsorted(self.val_docs, start):np.searchsorted(self.val_docs, stop)] - start] = True
            yield batch["text"], held
            start = stop


def _write_part(corpus: _Corpus, index: int, num_shards: int, work: Path, tok, dtype: np.dtype,
                opts: PrepareOptions) -> dict:
    """Tokenise one part into its token files, then write its manifest (the mark of a finished part)."""
    stem = part_name(index, num_shards)
    files = {split: f"{split}.bin" if num_shards == 1 else f"{split}-{stem[len('part-'):]}.bin" for split in SPLITS}
    counts = {split: {"file": files[split], "tokens": 0, "documents": 0} for split in SPLITS}
    partial = {split: work / f".{files[split]}.partial" for split in SPLITS}
    start = time.perf_counter()
    lo, hi = (0, None) if corpus.num_docs is None else corpus.part_range(index, num_shards)
    desc = "Tokenizing" if num_shards == 1 else f"Tokenizing part {index + 1}/{num_shards}"
    with open(partial["train"], "wb") as train, open(partial["val"], "wb") as val, \
            tqdm(total=hi and hi - lo, unit="doc", desc=desc) as bar:
        for ids, lengths, held_out in _encoded(corpus.batches(index, num_shards, opts), tok, opts.num_proc):
            if corpus.num_docs == 1:  # one document (a book): hold out its last tokens instead
                held_tokens = _held_out_tail(len(ids), opts.val_fraction)
                held_out = np.array([False])
            else:
                held_tokens = np.repeat(held_out, lengths)
            for split, out, mask in (("train", train, ~held_tokens), ("val", val, held_tokens)):
                chunk = ids[mask].astype(dtype)
                out.write(chunk.tobytes())
                counts[split]["tokens"] += len(chunk)
            counts["val"]["documents"] += int(held_out.sum())
            counts["train"]["documents"] += int((~held_out).sum())
            bar.update(len(lengths))
            bar.set_postfix(tokens=f"{counts['train']['tokens'] + counts['val']['tokens']:,}", refresh=False)
    for split in SPLITS:
        partial[split].rename(work / files[split])
    tokens, seconds = counts["train"]["tokens"] + counts["val"]["tokens"], time.perf_counter() - start
    print(f"Tokenized part {index + 1} of {num_shards}: {tokens:,} tokens in {seconds:.1f} s "
          f"({tokens / seconds:,.0f} tokens/s)")
    return {"shard_index": index, "num_shards": num_shards, "splits": counts}


def _held_out_tail(num_tokens: int, val_fraction: float) -> np.ndarray:
    cut = num_tokens - max(2, round(val_fraction * num_tokens))
    if cut < 2:
        raise UserError(f"the input holds one document of {num_tokens} tokens: too little to split")
    return np.arange(num_tokens) >= cut


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.rename(path)


# --- the whole preparation ---------------------------------------------------------------------

def _return_large_buffers_to_the_system() -> None:
    """Fix glibc's mmap threshold at its default. Left dynamic, it rises after the first large
    batch is freed, and later batches' buffers then fragment the heap, so peak memory creeps up
    with the corpus; fixed, every large buffer is mapped and unmapped whole."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _check_options(opts: PrepareOptions) -> None:
    if not 0 < opts.val_fraction < 1:
        raise UserError(f"--val_fraction must lie between 0 and 1, got {opts.val_fraction}")
    if opts.num_proc < 0:
        raise UserError(f"--num_proc must be 0 (automatic) or positive, got {opts.num_proc}")
    if opts.num_shards < 1:
        raise UserError(f"--num_shards must be at least 1, got {opts.num_shards}")
    if opts.shard_index is not None and not 0 <= opts.shard_index < opts.num_shards:
        raise UserError(f"--shard_index must lie in 0..{opts.num_shards - 1} (--num_shards {opts.num_shards}), "
                        f"got {opts.shard_index}")
    if not opts.tokenizer and (opts.shard_index is not None or opts.streaming):
        raise UserError("preparing one part (--shard_index) or a stream needs a fixed --tokenizer, so that every "
                        "part uses the same ids; train one first with tools/train_tokenizer.py")
    if not opts.tokenizer:
        check_vocab_size(opts.vocab_size)


def _default_num_proc(tok) -> int:
    """One process on a few cores: a Rust tokenizer threads each batch itself, and that beats
    worker processes that compete with the reading process (measured on 2 cores). One
    worker per core on bigger machines, or with a Python tokenizer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cores <= 4 and getattr(tok, "is_fast", False) else cores


def _work_folder(out_dir: Path, opts: PrepareOptions, digest: str) -> Path:
    """Where the parts are written: the output itself for one part (it gathers parts from
    elsewhere), else a partial folder beside it that a rerun resumes."""
    if opts.shard_index is None:
        if not folders.is_empty(out_dir) and not opts.overwrite:
            raise UserError(f"output folder {out_dir} already holds other data; choose another --output_dir or pass "
                            "--overwrite")
        folders.check_replaceable(out_dir, DATA_KIND, opts.overwrite, "--overwrite", owned=_is_data_folder(out_dir))
        return out_dir.parent / f".{out_dir.name}.partial-{digest}"
    if not folders.is_empty(out_dir) and not folders.written_here(out_dir, DATA_KIND):
        raise UserError(f"output folder {out_dir} holds other files; gather the parts in an empty folder or one "
                        "prepared here")
    if (out_dir / META_FILE).is_file():
        raise UserError(f"output folder {out_dir} is already a complete prepared folder; gather the parts of "
                        "another preparation in another folder")
    folders.check_creatable(out_dir, "output folder")
    return out_dir


def _load_corpus(expanded, opts: PrepareOptions) -> _Corpus:
    """The documents as a stream, so nothing is held whole in memory or copied into a cache. Unless
    the input is a hub stream, one pass counts them first (reading is fast next to tokenising)."""
    texts = sources.load_texts(expanded, opts.text_field, opts.split, streaming=True, stream_hub=opts.streaming)
    if opts.streaming:
        if texts.num_shards < opts.num_shards:
            raise UserError(f"the stream has {texts.num_shards} source file(s), fewer than --num_shards "
                            f"{opts.num_shards}; a stream is split by its files")
        return _Corpus(texts, None, None)
    num_docs = sum(len(batch["text"]) for batch in tqdm(sources.read_batches(texts, BATCH_DOCUMENTS), desc="Counting "
                                                          "documents", unit="batch"))
    if num_docs == 0:
        raise UserError("the inputs hold no non-empty documents")
    return _Corpus(texts, num_docs, _val_documents(num_docs, opts.val_fraction, opts.seed))


def _tokenizer(work: Path, corpus: _Corpus, opts: PrepareOptions):
    """The given tokenizer, or one already trained into the work folder, or a new BPE."""
    if opts.tokenizer:
        return load_tokenizer(opts.tokenizer)
    if (work / TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return load_tokenizer(work / TOKENIZER_DIR)  # resuming: trained before the stop
    print(f"Training a byte-level BPE tokenizer (vocabulary {opts.vocab_size}) on {corpus.num_docs} documents")
    return train_bpe(text_batches(corpus.texts), opts.vocab_size, length=corpus.num_docs)


def _save_tokenizer(tok, work: Path) -> str:
    """Save the tokenizer into the folder unless a part already did; its digest must then match."""
    target = work / TOKENIZER_DIR
    if not (target / "tokenizer_config.json").is_file():
        tmp = folders.temporary_beside(target)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    return tokenizers.digest(target)


def prepare(opts: PrepareOptions) -> dict:
    """Prepare (or reuse) a data folder, or one part of it; returns its index (or the part's manifest)."""
    _check_options(opts)
    default_corpus = not opts.inputs
    inputs = [str(p) for p in sources.default_corpus_files()] if default_corpus else opts.inputs
    expanded = sources.expand(inputs, opts.file_pattern)
    out_dir = Path(opts.output)
    options = _options(opts)
    digest = sources.fingerprint(expanded, options)
    if (out_dir / META_FILE).is_file():
        existing = json.loads((out_dir / META_FILE).read_text())
        if existing.get("fingerprint") == digest:
            read_meta(out_dir)  # still complete and intact
            print(f"Reusing prepared data in {out_dir} (same inputs and options)")
            return existing
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} exists and is not a folder")
    work = _work_folder(out_dir, opts, digest)

    _return_large_buffers_to_the_system()
    corpus = _load_corpus(expanded, opts)
    tok = _tokenizer(work, corpus, opts)
    opts = dataclasses.replace(opts, num_proc=opts.num_proc or _default_num_proc(tok))
    work.mkdir(parents=True, exist_ok=True)
    if not folders.written_here(work, DATA_KIND):
        folders.mark(work, DATA_KIND)
    shared = _shared_facts(opts, options, digest, corpus, tok, _save_tokenizer(tok, work),
                           [spec for _, spec in expanded] if default_corpus else inputs, default_corpus)
    done = _write_parts(corpus, work, tok, opts, shared)
    if len(done) < opts.num_shards:
        left = opts.num_shards - len(done)
        print(f"Prepared part {opts.shard_index} of {opts.num_shards} in {out_dir}; {left} part(s) still to come. "
              "Copy the other parts' files into this folder: it reads as one once all are there")
        return done[opts.shard_index]
    meta = index_from_parts(work, done, fingerprint=digest)
    _write_json(work / META_FILE, meta)
    if work != out_dir:
        folders.move_into_place(work, out_dir)
    summary = ", ".join(f"{s}: {c['tokens']:,} tokens in {c['documents']:,} documents" for s, c in meta["splits"].items())
    shards = f", {opts.num_shards} shards" if opts.num_shards > 1 else ""
    print(f"Prepared {out_dir} ({shared['dtype']}, vocabulary {len(tok)}{shards}; {summary})")
    return meta


def _options(opts: PrepareOptions) -> dict[str, Any]:
    """The options that decide what a preparation writes (part of its fingerprint)."""
    return {
        "format": FORMAT_VERSION,
        "tokenizer": str(Path(opts.tokenizer).resolve()) if opts.tokenizer else f"bpe-{opts.vocab_size}",
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "text_field": opts.text_field,
        "split": opts.split,
        "num_shards": opts.num_shards,
        "streaming": opts.streaming,
    }


def _shared_facts(opts: PrepareOptions, options: dict[str, Any], digest: str, corpus, tok, tokenizer_digest: str,
                  inputs: list[str], default_corpus: bool) -> dict[str, Any]:
    """What every part's manifest and the folder's index record."""
    return {
        "format": FORMAT_VERSION,
        # What parts must agree on to form one folder: not local paths or times, which differ by machine.
        "preparation": hashlib.sha256(json.dumps({
            **{k: v for k, v in options.items() if k != "tokenizer"}, "tokenizer": tokenizer_digest,
            "documents": corpus.num_docs, "inputs": inputs,
        }, sort_keys=True).encode()).hexdigest()[:16],
        "fingerprint": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": "python-stdlib" if default_corpus else opts.inputs,
        "tokenizer": TOKENIZER_DIR,
        "tokenizer_source": opts.tokenizer or f"byte-level BPE trained here, vocabulary {opts.vocab_size}",
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "dtype": token_dtype(len(tok)).name,
        "documents_separated_by": "eos",
        "options": options,
    }


def _write_parts(corpus, work: Path, tok, opts: PrepareOptions, shared: dict[str, Any]) -> dict[int, dict]:
    """Write the part(s) this command prepares, keeping those already there; returns every part's manifest."""
    done = read_parts(work)
    wanted = range(opts.num_shards) if opts.shard_index is None else [opts.shard_index]
    for index in wanted:
        if index in done and done[index]["preparation"] == shared["preparation"]:
            print(f"Part {index + 1} of {opts.num_shards} is already prepared in {work}; keeping it")
            continue
        if index in done:
            raise UserError(f"{part_name(index, opts.num_shards)}.json in {work} comes from another preparation "
                            "(other inputs, options or tokenizer); use another --output")
        if done and next(iter(done.values()))["preparation"] != shared["preparation"]:
            raise UserError(f"{work} holds parts of another preparation (other inputs, options or tokenizer); "
                            "use another --output")
        manifest = {**shared, **_write_part(corpus, index, opts.num_shards, work, tok, token_dtype(len(tok)), opts)}
        _write_json(work / f"{part_name(index, opts.num_shards)}.json", manifest)
        done[index] = manifest
    return done


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
