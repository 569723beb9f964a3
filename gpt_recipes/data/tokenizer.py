"""Tokenizers: load any local Hugging Face tokenizer, or train a byte-level BPE one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gpt_recipes import console
from gpt_recipes.errors import UserError, first_line

EOS_TOKEN = "<|endoftext|>"
# Documents are packed into fixed windows, so the tokenizer should never truncate or warn.
NO_LENGTH_LIMIT = int(1e30)


# Far past any real vocabulary (GPT-4's has about 100k, Gemma's 256k); the BPE trainer aborts
# the whole process on sizes near the limits of its own integers.
MAX_VOCAB_SIZE = 2**20


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < 300:
        raise UserError(f"--vocab_size {vocab_size} is too small for a byte-level BPE (needs 256 bytes + merges)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab_size {vocab_size} is beyond reason (at most {MAX_VOCAB_SIZE:,}; real tokenizers "
                        "have 32k-256k)")


def train_bpe(texts: Iterable[str | list[str]], vocab_size: int, length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer (no unknown tokens; EOS is its one special token)."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=console.progress_bars(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=NO_LENGTH_LIMIT,
    )


def vocabulary_digest(tokenizer) -> str:
    """A digest of every token and its id: two tokenizers of one size but trained on other text differ."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (or hub name when online); it must define an EOS token."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as err:
        raise UserError(f"could not load tokenizer {name_or_path}: {first_line(err)}")
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name_or_path} defines no EOS token, which separates packed documents")
    tok.model_max_length = NO_LENGTH_LIMIT
    return tok


def text_batches(ds, batch_size: int = 1000) -> Iterator[list[str]]:
    """Yield lists of texts from a Dataset with a "text" column, for tokenizer training."""
    for batch in ds.iter(batch_size=batch_size):
        yield batch["text"]


def digest(folder: Path) -> str:
    """sha256 of what decides a saved tokenizer's ids: tokenizer.json (vocabulary, merges,
    normalisation, special tokens), or every file of a tokenizer without one.
    tokenizer_config.json is left out: saving the same tokenizer again adds loading options to it."""
    files = [folder / "tokenizer.json"]
    if not files[0].is_file():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "tokenizer_config.json")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()
