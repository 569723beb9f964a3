#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on local text and save it as a Hugging Face tokenizer folder.

    python tools/train_tokenizer.py books/ --vocab_size 16384 --output_dir tokenizers/books
    python tools/prepare_data.py books/ --tokenizer tokenizers/books --output_dir data/books

(prepare_data.py trains one by itself when given no --tokenizer; this tool is for sharing
one tokenizer between several data folders.)
"""

from dataclasses import dataclass
from pathlib import Path

from gpt_recipes import folders
from gpt_recipes.args import flag, parse_args
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.data import sources
from gpt_recipes.data.tokenizer import check_vocab_size, text_batches, train_bpe
from gpt_recipes.errors import cli_entry

TOKENIZER_KIND = "tokenizer"


@dataclass
class TrainTokenizerArgs:
    """Train a byte-level BPE tokenizer that AutoTokenizer.from_pretrained loads."""

    inputs: list[str] = flag([], "text files, folders, globs, JSONL/Parquet files, a datasets folder or a hub name "
                             "(default: the built-in corpus)", positional=True, metavar="INPUT")
    output_dir: str = flag("data/tokenizer", "folder to save the tokenizer to", aliases=["output"])
    vocab_size: int = flag(8192, "vocabulary size, including the EOS token")
    text_field: str = flag("text", "field holding the text in JSONL/Parquet/datasets inputs")
    split: str = flag("train", "split to read from saved or hub datasets")
    file_pattern: str = flag("*", "files to take from input folders (a glob, e.g. '*.txt')")
    overwrite: bool = flag(False, "replace an existing non-empty output folder")


@cli_entry
def main() -> None:
    args = parse_args(TrainTokenizerArgs, description=__doc__)
    out = Path(args.output_dir)
    check_vocab_size(args.vocab_size)
    check_output_path(out, "--output_dir", {"INPUT": [p for p in args.inputs if Path(p).exists()]})
    folders.check_replaceable(out, TOKENIZER_KIND, args.overwrite, "--overwrite")
    inputs = args.inputs or [str(p) for p in sources.default_corpus_files()]
    texts = sources.load_texts(sources.expand(inputs, args.file_pattern), args.text_field, args.split)
    tokenizer = train_bpe(text_batches(texts), args.vocab_size, length=len(texts))
    with folders.written_aside(out, TOKENIZER_KIND, args.overwrite) as tmp:
        tokenizer.save_pretrained(tmp)
    print(f"Saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {out}")


if __name__ == "__main__":
    main()
