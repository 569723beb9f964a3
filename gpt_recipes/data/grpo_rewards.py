"""The GRPO demo's reward functions, with TRL's signature: f(prompts, completions, **columns) -> list[float].

The demo prompts (data/grpo_demo/) ask what a standard-library function does; each row carries
the function's `signature` and its docstring's first sentence as `reference`. Both rewards are
verifiable from the row alone; write your own the same way and name it with --reward_funcs.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def reference_overlap(prompts, completions, reference, **_) -> list[float]:
    """How well the answer matches the docstring's sentence: F1 of their word sets, 0 to 1."""
    scores = []
    for completion, answer in zip(completions, reference):
        ours, theirs = _words(completion), _words(answer)
        common = len(ours & theirs)
        scores.append(0.0 if not common else 2 * common / (len(ours) + len(theirs)))
    return scores


def full_sentence(prompts, completions, **_) -> list[float]:
    """1 for one sentence of 6 to 16 words ending with a period (the length of most docstrings' first
    sentences; the fine-tuned demo model answers in about 4 words), else 0."""
    return [float(c.strip().endswith(".") and ". " not in c.strip() and 6 <= len(c.split()) <= 16)
            for c in completions]
