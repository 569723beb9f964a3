"""Shared building blocks for the DeepSpeed GPT training recipes."""
