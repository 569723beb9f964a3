"""FLOPs per token against hand counts, MFU arithmetic, and the peak table."""

import pytest

from gpt_recipes.metrics.flops import flops_shape, mfu, table_peak
from gpt_recipes.models.causal_lm import build_config


def test_gpt2_flops_match_a_hand_count():
    # gpt2-micro: 6 layers, d=384, 6 heads, 4d MLP, vocabulary 8192, head tied to the embedding.
    L, d, V, T = 6, 384, 8192, 256
    per_layer = 3 * d * d + d * d + 4 * d * d + 4 * d * d  # qkv, attention out, MLP up, MLP down
    hand = 6 * (L * per_layer + V * d) + 12 * L * T * d
    shape = flops_shape(build_config("gpt2-micro", V, 0))
    assert shape.matmul_params == L * per_layer + V * d
    assert shape.per_token(T) == hand


def test_llama_flops_match_a_hand_count():
    # llama-1b's shape: 16 layers, d=2048, 32 heads of 64, 8 KV heads (GQA), SwiGLU 8192, tied head.
    L, d, heads, kv, ffn, V, T = 16, 2048, 32, 8, 8192, 8192, 2048
    head_dim = d // heads
    per_layer = d * d + 2 * d * kv * head_dim + d * d + 3 * d * ffn  # q, k+v, o, gate+up+down
    hand = 6 * (L * per_layer + V * d) + 12 * L * T * heads * head_dim
    assert flops_shape(build_config("llama-1b", V, 0)).per_token(T) == hand


def test_mfu_arithmetic():
    # 1e9 FLOPs/token at 100,000 tokens/s over 4 ranks = 25 TFLOP/s per rank; of a 100 peak, 25%.
    tflops, util = mfu(1e9, 100_000, 4, 100.0)
    assert tflops == pytest.approx(25.0) and util == pytest.approx(0.25)
    assert mfu(1e9, 100_000, 4, None) == (pytest.approx(25.0), None)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp32", 66.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L40S", "bf16", 362.1),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40", "bf16", 181.0),  # not L4's figure
    ("NVIDIA H200 NVL", "bf16", 835.5),  # not the SXM figure
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
])
def test_peak_table(name, precision, peak):
    assert table_peak(name, precision)[0] == peak


def test_peak_table_has_no_guess_for_unknown_devices():
    assert table_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on V100
    assert table_peak("Some Future GPU", "bf16") is None
    assert table_peak("NVIDIA RTX A1000", "bf16") is None  # not an A100
    assert table_peak("NVIDIA L4000", "bf16") is None
