"""Next-token cross-entropy for causal LMs, with the output layer fused into it where possible.

The plain route asks the model for logits (tokens x vocabulary) and takes the cross-entropy:
autograd keeps their fp32 log-softmax for the backward pass, which makes their gradient,
and element-wise passes run over all of them several times. The fused route asks the model
for its final hidden states only and projects them onto the vocabulary a chunk of rows at a time;
each chunk's gradient (softmax minus one-hot) is taken on the spot, multiplied into the
gradients of the hidden states and of the output weight, and dropped. The matmuls are the
same; the element-wise work over the logits is done once, on chunks that stay in cache, and
the logits never exist whole. It needs the output weight whole on every rank, so ZeRO-3
(which partitions it) takes the plain route.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Elements of logits per chunk. On a CPU, 32 MiB in fp32 (1024 rows of an 8192-token
# vocabulary): matmuls run at full speed and the element-wise passes stay near the cache.
# On a GPU, 256 MiB: few enough chunks that kernel launches do not add up.
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
# Model types whose logits are exactly lm_head(final hidden states): no bias, scaling or
# soft-capping after the output layer, so the fused loss equals the plain one.
FUSABLE_MODEL_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (in fp32) over the targets that are not -100: their mean or sum."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                           want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(sum over rows of cross_entropy(hidden @ weight.T, targets), and with want_grads the
    gradients of that sum with respect to hidden and weight), one chunk of rows at a time."""
    valid = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~valid, 0)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    # Summed in fp32 over chunks, as one matmul over all rows would accumulate.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        h, t, v = hidden[rows], safe_targets[rows, None], valid[rows]
        logits = (h @ weight.t()).float()
        lse = torch.logsumexp(logits, dim=1)
        total += ((lse - logits.gather(1, t).squeeze(1)) * v).sum()
        if want_grads:
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
            grad = grad.mul_(v[:, None]).to(hidden.dtype)
            torch.mm(grad, weight, out=grad_hidden[rows])
            if h.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), h)
            else:
                grad_weight += (grad.t() @ h).float()
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), gradients taken in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, targets, chunk, want_grads=True)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """lm_loss(hidden @ weight.T, targets, reduction) without ever holding all the logits."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    device_type = hidden.device.type
    chunk = max(1, CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cuda"]) // weight.shape[0])
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast:  # cast as autocast would for a matmul, then keep it off inside the Function
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    # needs_input_grad inside a Function reflects requires_grad alone, not torch.no_grad(): decide here,
    # so evaluation computes the loss without the gradients.
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if want_grads:
            total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
        else:
            total = _chunked_cross_entropy(hidden, weight, targets, chunk, want_grads=False)[0]
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum()


def fused_unavailable(model: torch.nn.Module, zero_stage: int) -> str | None:
    """Why the fused loss cannot serve this model, or None when it can."""
    if zero_stage == 3:
        return "ZeRO-3 partitions the output layer's weight"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FUSABLE_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose logits are known to be its output layer alone"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "the output layer is not a Linear layer without bias"
    return None


class CausalLMLoss:
    """The loss the recipes train and evaluate with: fused with the model's output layer, or from its logits.

    Call it with the model (or the DeepSpeed engine wrapping it, so the engine's hooks and
    timers run), the model inputs and the next-token targets.
    """

    perplexity = True  # its mean is per token

    def __init__(self, model: torch.nn.Module, fused: bool):
        self.head = model.get_output_embeddings() if fused else None

    def for_evaluation(self) -> "CausalLMLoss":
        return self

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        return {}

    @property
    def fused(self) -> bool:
        return self.head is not None

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        if self.head is None:
            return lm_loss(forward(**inputs).logits, targets, reduction)
        no_positions = torch.empty(0, dtype=torch.long, device=targets.device)  # the model computes no logits
        out = forward(**inputs, logits_to_keep=no_positions, output_hidden_states=True)
        return linear_cross_entropy(out.hidden_states[-1], self.head.weight, targets, reduction)
