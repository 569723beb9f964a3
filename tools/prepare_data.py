#!/usr/bin/env python
"""Prepare pretraining data: text in, packed token files and a tokenizer out.

    python tools/prepare_data.py                                  # built-in default corpus
    python tools/prepare_data.py books/ notes/*.md --output_dir data/mine
    python tools/prepare_data.py corpus.jsonl --text_field body --tokenizer my_tokenizer/ --output_dir data/mine

Re-running with the same inputs and options reuses the prepared folder.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt_recipes.args import flag, parse_args
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.data.prepare import PrepareOptions, prepare
from gpt_recipes.errors import cli_entry


@dataclass
class PrepareDataArgs:
    """Tokenise text into packed, memory-mappable token files for pretraining.

    With no INPUT and no --tokenizer, prepares the built-in default: the Python standard
    library's source with a byte-level BPE tokenizer trained on it.
    """

    inputs: list[str] = flag(
        [],
        "text files, folders, globs, JSONL/Parquet files, a datasets folder (save_to_disk) or a hub name",
        positional=True,
        metavar="INPUT",
    )
    output_dir: str = flag("data/stdlib", "data folder to write (token files, meta.json, tokenizer/)",
                           aliases=["output"])
    tokenizer: Optional[str] = flag(None, "Hugging Face tokenizer folder; default: train a byte-level BPE on the inputs")
    vocab_size: int = flag(8192, "vocabulary size when training a tokenizer")
    val_fraction: float = flag(0.02, "fraction of documents held out for validation")
    seed: int = flag(1234, "seed for the document shuffle and split")
    text_field: str = flag("text", "field holding the text in JSONL/Parquet/datasets inputs")
    split: str = flag("train", "split to read from saved or hub datasets")
    file_pattern: str = flag("*", "files to take from input folders (a glob, e.g. '*.txt')")
    num_proc: int = flag(0, "tokenising processes (0: one, threaded by the tokenizer, on up to 4 cores; else one "
                         "per core)")
    num_shards: int = flag(1, "split the output into this many parts (shards); a stopped run resumes from "
                           "finished parts")
    shard_index: Optional[int] = flag(None, "prepare only this part (0-based), e.g. on one of several machines; "
                                      "copy the parts into one folder to use it (needs --tokenizer)")
    streaming: bool = flag(False, "read the inputs as a stream, e.g. a hub dataset without downloading it whole "
                           "(needs --tokenizer; parts split the stream by its files)")
    overwrite: bool = flag(False, "replace an existing data folder prepared from other inputs")


@cli_entry
def main() -> None:
    args = parse_args(PrepareDataArgs, description=__doc__)
    check_output_path(args.output_dir, "--output_dir", {"INPUT": [p for p in args.inputs if Path(p).exists()],
                                                **({"--tokenizer": args.tokenizer} if args.tokenizer else {})})
    options = vars(args)
    prepare(PrepareOptions(output=options.pop("output_dir"), **options))


if __name__ == "__main__":
    main()
