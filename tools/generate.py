#!/usr/bin/env python
"""Generate text from a Hugging Face model folder (for example one written by convert_to_hf.py).

    python tools/generate.py exported/quickstart --prompt "def main(" --max_new_tokens 60
    python tools/generate.py exported/finetuned --chat \\
        --prompt "In Python's json module, what does dumps(obj) do?"

With --chat the prompt is a user message rendered with the model's chat template.

By default it samples (temperature 0.8, nucleus top_p 0.95, repetition penalty 1.1, seeded):
a small model decoded greedily tends to repeat one phrase, which shows it unfairly.
--temperature 0 decodes greedily; --seed picks another sample.
"""

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from gpt_recipes.args import flag, parse_args
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import UserError, cli_entry
from gpt_recipes.models.causal_lm import context_length
from gpt_recipes.pretrained import load_model_folder


@dataclass
class GenerateArgs:
    """Generate from a Hugging Face model folder."""

    model: str = flag("exported/quickstart", "model folder", positional=True, nargs="?", metavar="MODEL_DIR")
    prompt: str = flag("def main(", "text to continue (with --chat: the user's message)")
    chat: bool = flag(False, "render the prompt with the model's chat template")
    max_new_tokens: int = flag(60, "tokens to generate")
    temperature: float = flag(0.8, "sampling temperature; 0 for greedy decoding")
    top_p: float = flag(0.95, "sample from the smallest set of tokens whose probabilities reach this (nucleus)")
    repetition_penalty: float = flag(1.1, "divide the scores of tokens already present by this (1: off)")
    seed: int = flag(0, "seed for sampling")


@cli_entry
def main() -> None:
    args = parse_args(GenerateArgs, description=__doc__)
    if not args.prompt:
        raise UserError("--prompt is empty; give the text to continue")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must lie in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be positive, got {args.repetition_penalty}")
    config = load_model_folder(args.model, "MODEL")  # one line for a missing, mismatched or training folder
    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    text = args.prompt
    if args.chat:
        if not tokenizer.chat_template:
            raise UserError(f"{args.model} has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    room = context_length(config) - ids.shape[1]
    if args.max_new_tokens > room:
        raise UserError(f"the prompt is {ids.shape[1]} tokens and the model reads at most {context_length(config)}: "
                        f"--max_new_tokens can be at most {room}, got {args.max_new_tokens}")
    torch.manual_seed(args.seed)
    sampling = ({"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0
                else {"do_sample": False})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             repetition_penalty=args.repetition_penalty, **sampling)
    print(text + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
