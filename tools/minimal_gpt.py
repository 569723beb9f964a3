"""A minimal GPT-2 written out in plain PyTorch: the benchmark's "minimal single-file trainer" model.

tools/benchmark.py runs it in tools/plain_pytorch_loop.py (`--model_impl minimal`) beside the
transformers GPT-2 class, to show what a model with no framework around it reaches on the same
shape. Same architecture as the GPT-2 presets: learned positions, pre-LayerNorm blocks, causal
SDPA attention, tanh GELU, output layer tied to the token embedding, GPT-2's initialisation.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in self.qkv(self.ln_1(x)).split(width, 2))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, width)
        x = x + self.proj(attn)
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class MinimalGPT(nn.Module):
    """Takes input_ids; returns .logits, or the final hidden states alone when asked (as transformers does)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: N(0, 0.02), residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, logits_to_keep: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> SimpleNamespace:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        kept = x if logits_to_keep is None else x[:, logits_to_keep]
        return SimpleNamespace(logits=self.lm_head(kept), hidden_states=(x,) if output_hidden_states else None)


if __name__ == "__main__":  # a module, not a command: say how it is used
    print(__doc__.strip())
