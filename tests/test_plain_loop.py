"""The benchmark's references: tools/minimal_gpt.py and tools/plain_pytorch_loop.py."""

import sys

import pytest
import torch
from launch import REPO, read_metrics, run_python

from gpt_recipes.models import build_config, build_model

sys.path.insert(0, str(REPO / "tools"))
from minimal_gpt import MinimalGPT  # noqa: E402


def _copy_gpt2_weights(hf, minimal: MinimalGPT) -> None:
    """transformers' GPT-2 keeps its projections as Conv1D (in x out); Linear is out x in."""
    t = hf.transformer
    with torch.no_grad():
        minimal.wte.weight.copy_(t.wte.weight)
        minimal.wpe.weight.copy_(t.wpe.weight)
        minimal.ln_f.load_state_dict(t.ln_f.state_dict())
        for block, h in zip(minimal.blocks, t.h):
            block.ln_1.load_state_dict(h.ln_1.state_dict())
            block.ln_2.load_state_dict(h.ln_2.state_dict())
            for mine, theirs in ((block.qkv, h.attn.c_attn), (block.proj, h.attn.c_proj),
                                 (block.fc, h.mlp.c_fc), (block.fc_out, h.mlp.c_proj)):
                mine.weight.copy_(theirs.weight.t())
                mine.bias.copy_(theirs.bias)


def test_minimal_gpt_is_the_gpt2_presets_architecture(tiny_model):
    config = build_config(str(tiny_model), 1000, 0)
    config.activation_function = "gelu_pytorch_tanh"  # as the GPT-2 presets set it
    torch.manual_seed(0)
    hf = build_model(config).eval()
    minimal = MinimalGPT(config).eval()
    assert sum(p.numel() for p in minimal.parameters()) == sum(p.numel() for p in hf.parameters())
    _copy_gpt2_weights(hf, minimal)
    ids = torch.randint(0, 1000, (2, 40))
    torch.testing.assert_close(minimal(ids).logits, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_plain_loop_with_and_without_the_fused_loss(tmp_path, tiny_data, tiny_model):
    """The reference loop trains the same with either loss, and runs the minimal GPT."""
    losses = {}
    for name, extra in (("fused", []), ("plain", ["--no-fused_loss"]), ("minimal", ["--model_impl", "minimal"])):
        out = tmp_path / name
        proc = run_python("tools/plain_pytorch_loop.py", ["--data", str(tiny_data), "--model", str(tiny_model),
                                                          "--seq_len", "64", "--global_batch", "4", "--max_steps", "6",
                                                          "--log_interval", "1", "--output_dir", str(out), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        train, _ = read_metrics(out)
        assert [r["step"] for r in train] == list(range(1, 7)) and all(r["tokens_per_sec"] > 0 for r in train)
        losses[name] = [r["loss"] for r in train]
    assert losses["fused"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["minimal"][-1] < losses["minimal"][0] - 0.1  # it learns
