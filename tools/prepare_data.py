#!/usr/bin/env python
"""Prepare pretraining data: text in, packed token files and a tokenizer out.

    python tools/prepare_data.py                                  # built-in default corpus
    python tools/prepare_data.py books/ notes/*.md --output data/mine
    python tools/prepare_data.py corpus.jsonl --text_field body --tokenizer my_tokenizer/ --output data/mine

Re-running with the same inputs and options reuses the prepared folder.
"""

from gpt_recipes.args import PrepareDataArgs, parse_args
from gpt_recipes.data.prepare import PrepareOptions, prepare
from gpt_recipes.errors import cli_entry


@cli_entry
def main() -> None:
    args = parse_args(PrepareDataArgs, description=__doc__)
    prepare(PrepareOptions(**vars(args)))


if __name__ == "__main__":
    main()
