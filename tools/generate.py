#!/usr/bin/env python
"""Generate text from a Hugging Face model folder (for example one written by convert_to_hf.py).

    python tools/generate.py exported/quickstart --prompt "def main(" --max_new_tokens 60
    python tools/generate.py exported/finetuned --chat \\
        --prompt "In Python's json module, what does dumps(obj) do?"

With --chat the prompt is a user message rendered with the model's chat template.

By default it samples (temperature 0.8, nucleus top_p 0.95, repetition penalty 1.1, seeded):
a small model decoded greedily tends to repeat one phrase, which shows it unfairly.
--temperature 0 decodes greedily, and then no sampling setting applies (--top_p and
--repetition_penalty are refused with it); --seed picks another sample. The first line printed
says how the text was decoded.
"""

from dataclasses import dataclass
from typing import Optional

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
    top_p: Optional[float] = flag(None, "when sampling: sample from the smallest set of tokens whose probabilities "
                                  "reach this (nucleus; default 0.95)")
    repetition_penalty: Optional[float] = flag(None, "when sampling: divide the scores of tokens already present by "
                                               "this (1: off; default 1.1)")
    seed: int = flag(0, "seed for sampling")

    def decoding(self) -> dict:
        """generate()'s decoding settings: greedy at temperature 0, else sampling with the defaults filled."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": 0.95 if self.top_p is None else self.top_p,
                "repetition_penalty": 1.1 if self.repetition_penalty is None else self.repetition_penalty}

    def describe(self) -> str:
        how = self.decoding()
        if not how["do_sample"]:
            return f"Decoding: greedy (--temperature 0), up to {self.max_new_tokens} new tokens"
        return (f"Decoding: sampling at temperature {how['temperature']:g}, top_p {how['top_p']:g}, repetition penalty "
                f"{how['repetition_penalty']:g}, seed {self.seed} (--temperature 0: greedy), up to "
                f"{self.max_new_tokens} new tokens")


@cli_entry
def main() -> None:
    args = parse_args(GenerateArgs, description=__doc__)
    if not args.prompt:
        raise UserError("--prompt is empty; give the text to continue")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must lie in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be positive, got {args.repetition_penalty}")
    for name in ("top_p", "repetition_penalty"):
        if args.temperature == 0 and getattr(args, name) is not None:
            raise UserError(f"--{name} applies when sampling; --temperature 0 decodes greedily (the most likely "
                            f"token each time): drop --{name}, or sample with --temperature above 0")
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
    print(args.describe(), flush=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                             **args.decoding())
    print(text + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main()
