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


def one_sentence(prompts, completions, **_) -> list[float]:
    """1 for a single sentence of at most 20 words ending with a period, else 0."""
    return [float(c.strip().endswith(".") and c.count(". ") == 0 and len(c.split()) <= 20) for c in completions]
