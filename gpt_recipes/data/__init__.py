"""Prepared data: text sources, tokenizers, packed token files, mixtures, fine-tuning rows."""
