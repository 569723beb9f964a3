#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on local text and save it as a Hugging Face tokenizer folder.

    python tools/train_tokenizer.py books/ --vocab_size 16384 --output tokenizers/books
    python tools/prepare_data.py books/ --tokenizer tokenizers/books --output data/books

(prepare_data.py trains one by itself when given no --tokenizer; this tool is for sharing
one tokenizer between several data folders.)
"""

from pathlib import Path

from gpt_recipes import sources
from gpt_recipes.args import TrainTokenizerArgs, parse_args
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.tokenizer import text_batches, train_bpe


@cli_entry
def main() -> None:
    args = parse_args(TrainTokenizerArgs, description=__doc__)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"output folder {out} is not empty; choose another --output or pass --overwrite")
    inputs = args.inputs or [str(p) for p in sources.default_corpus_files()]
    texts = sources.load_texts(sources.expand(inputs, args.file_pattern), args.text_field, args.split)
    tokenizer = train_bpe(text_batches(texts), args.vocab_size, length=len(texts))
    tokenizer.save_pretrained(out)
    print(f"Saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {out}")


if __name__ == "__main__":
    main()
