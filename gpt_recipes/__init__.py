"""Shared building blocks for the DeepSpeed GPT training recipes."""

from gpt_recipes import console

console.install()
