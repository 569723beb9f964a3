"""Model FLOPs per token, device peaks, and model FLOPs utilisation (MFU).

Training FLOPs per token (forward + backward = 3x forward, one multiply-add = 2 FLOPs),
as in the PaLM paper's appendix B (Chowdhery et al., 2022):

    6 * N_matmul  +  12 * n_layers * seq_len * d_attn

- N_matmul counts the weights of every matrix multiply: the attention and MLP projections
  of each block and the output head (vocab x d_model, counted even when it is tied to the
  input embedding, because it is a real matmul). Input embeddings (token and position
  lookups), norms and biases are left out: they are lookups or element-wise work. In a
  mixture-of-experts model a token passes through its layer's router and top_k of E experts,
  so N_matmul counts the routers and top_k / E of the experts' weights (active parameters).
- The second term is attention's two matmuls (Q K^T and the weighted sum of V) over the
  full seq_len x seq_len square; d_attn = n_heads * head_dim. Causal attention kernels can
  skip half of it; it is counted whole, as PaLM and nanoGPT do, so figures compare.

MFU = achieved model FLOP/s per rank / the rank's peak dense FLOP/s at the training
precision. Recomputation (activation checkpointing) is not counted as useful work.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

TERA = 1e12

# Dense (no sparsity) peak TFLOP/s per device, from the vendors' data sheets, matched
# against torch.cuda.get_device_name() in order: every word must be a whole word of the
# name (split at spaces and hyphens), so "L4" is not "L40" and "A100" is not "RTX A1000".
# "fp32" is plain fp32: PyTorch does not use TF32 tensor cores for matmuls by default.
GPU_PEAKS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("H200", "NVL"), "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (("H200",), "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (("H100", "PCIe"), "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    (("H100", "NVL"), "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (("H100",), "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (("A100",), "A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (("L40S",), "L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    (("L40",), "L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    (("A10G",), "A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    (("L4",), "L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (("V100",), "V100", {"fp16": 125.0, "fp32": 15.7}),
]


@dataclass(frozen=True)
class FlopsShape:
    matmul_params: float
    n_layers: int
    d_attn: int

    def per_token(self, seq_len: int) -> float:
        return 6.0 * self.matmul_params + 12.0 * self.n_layers * seq_len * self.d_attn


def flops_shape(model_config: PretrainedConfig) -> FlopsShape:
    """Reads the model's matmul weights from an instance built on the meta device."""
    from transformers.pytorch_utils import Conv1D

    from gpt_recipes.models.causal_lm import build_model
    from gpt_recipes.models.moe import matmul_weights
    from gpt_recipes.parallel.experts import moe_shape

    with torch.device("meta"):
        model = build_model(model_config)
    shape = moe_shape(model_config)
    # Every Linear (GPT-2's blocks use Conv1D) including the output head, tied or not; in an MoE
    # model the routers and the top_k experts a token goes through (its active parameters).
    matmul = (matmul_weights(model, shape) if shape else
              sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))))
    c = model_config
    n_layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    n_heads = getattr(c, "num_attention_heads", None) or c.n_head
    width = getattr(c, "hidden_size", None) or c.n_embd
    head_dim = getattr(c, "head_dim", None) or width // n_heads
    return FlopsShape(matmul, n_layers, n_heads * head_dim)


def table_peak(device_name: str, precision: str) -> tuple[float, str] | None:
    """(peak TFLOP/s, which entry) for a GPU name at a precision; None if the table lacks it."""
    name_words = set(re.split(r"[\s-]+", device_name))
    for words, label, peaks in GPU_PEAKS:
        if name_words.issuperset(words) and precision in peaks:
            return peaks[precision], f"{label} data-sheet peak, {precision}"
    return None


def measure_matmul_peak(precision: str, size: int = 1024, seconds: float = 0.5) -> float:
    """TFLOP/s of the best of repeated size x size matmuls on this process's CPU threads."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / TERA


def mfu(flops_per_token: float, tokens_per_sec: float, world_size: int,
        peak_tflops: float | None) -> tuple[float, float | None]:
    """(model TFLOP/s per rank, MFU or None without a peak) for a global tokens_per_sec."""
    per_rank = flops_per_token * tokens_per_sec / world_size / TERA
    return per_rank, (per_rank / peak_tflops if peak_tflops else None)


def peak_tflops(device_type: str, precision: str, override: float | None) -> tuple[float | None, str]:
    """This rank's peak TFLOP/s for MFU and where it came from: --peak_tflops, the GPU
    table, or on a CPU a matmul probe (there is no data sheet for a share of a CPU)."""
    if override:
        return override, "--peak_tflops"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        found = table_peak(name, precision)
        if found:
            return found
        return None, f"{name} at {precision} is not in the peak table: pass --peak_tflops for MFU"
    if device_type == "cpu":
        probe_dtype = precision if precision != "fp16" else "fp32"
        return measure_matmul_peak(probe_dtype), (f"measured by a 1024x1024 {probe_dtype} matmul probe on "
                                                  f"{torch.get_num_threads()} CPU thread(s) per rank")
    return None, f"no peak known for {device_type}: pass --peak_tflops for MFU"


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    if device_type == "cpu":
        import platform

        return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s) per rank"
    return device_type
