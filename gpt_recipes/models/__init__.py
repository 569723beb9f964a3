"""Causal LMs from transformers: presets and building, the fused loss, LoRA adapters."""
