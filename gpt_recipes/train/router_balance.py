"""The router's load balancing of a mixture-of-experts model, as a loss part (train/step.py's Loss).

Any objective whose loss supports MoE models wraps it with `balanced`: the wrapped loss plus
the router's auxiliary loss, weighted as transformers and TRL weight it, and the expert load
(tokens per expert, imbalance, router entropy per layer) counted on the device and read once
per log line. `REPORT` gives the summariser its column and curve.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gpt_recipes.metrics.device_sums import DeviceSums
from gpt_recipes.metrics.summary import Column, Curve, Report
from gpt_recipes.parallel.experts import MoEShape, moe_shape


class RouterBalance:
    """A loss part for MoE models (see step.Loss): the wrapped loss plus `coef` x the router's
    load-balancing loss (the model's own `aux_loss`, Switch Transformer's), as transformers and
    TRL add it, and the expert load, summed on the device until read.

    With reduction "sum" each micro-batch's auxiliary loss is weighted by its targets, so the
    step's loss is the mean cross-entropy plus coef x the target-weighted mean auxiliary loss
    over the global batch's micro-batches, however they are spread over ranks."""

    def __init__(self, inner, shape: MoEShape, coef: float):
        self.inner, self.shape, self.coef = inner, shape, coef
        self.perplexity = inner.perplexity
        self.sums = DeviceSums()

    @property
    def fused(self) -> bool:
        return getattr(self.inner, "fused", False)

    def for_evaluation(self) -> "RouterBalance":
        """Held-out loss is the wrapped loss alone (comparable with a dense model's); the load is counted."""
        return RouterBalance(self.inner.for_evaluation(), self.shape, 0.0)

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        seen = {}

        def routed(**kwargs):
            seen["out"] = out = forward(**kwargs, output_router_logits=True)
            return out

        loss = self.inner(routed, inputs, targets, reduction)
        out = seen["out"]
        aux = out.aux_loss
        self._count(out.router_logits, inputs.get("attention_mask"))
        self.sums.add(aux_loss=aux.detach().float(), micro_batches=1.0)
        if self.coef:
            weight = (targets != -100).sum() if reduction == "sum" else 1
            loss = loss + self.coef * aux.to(loss.dtype) * weight
        return loss

    def _count(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> None:
        keep = None if mask is None else mask.reshape(-1, 1).float()
        figures = {}
        for layer, logits in enumerate(router_logits):
            probs = logits.detach().float().softmax(-1)
            if keep is not None and keep.shape[0] == probs.shape[0]:
                probs = probs * keep
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(self.shape.top_k, dim=-1).indices, 1.0)
            if keep is not None and keep.shape[0] == probs.shape[0]:
                chosen = chosen * keep
            figures[f"expert_tokens_{layer}"] = chosen.sum(0)
            figures[f"router_entropy_{layer}"] = -(probs * probs.clamp_min(1e-20).log()).sum()
            figures[f"router_rows_{layer}"] = keep.sum() if keep is not None and keep.shape[0] == probs.shape[0] \
                else float(probs.shape[0])
        self.sums.add(**figures)

    def take_metrics(self, prefix: str = "") -> dict[str, Any]:
        """aux_loss (the mean over micro-batches), and per layer the tokens each expert took (summed over
        ranks; they add up to tokens x top_k), the load imbalance (the fullest expert's tokens over the
        mean) and the router's mean entropy per token (nats; log(experts) is uniform routing)."""
        figures = self.inner.take_metrics(prefix)
        if not self.sums:
            return figures
        read = self.sums.read()
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in read if k.startswith("expert_tokens_"))
        tokens = {f"layer{i}": [round(v) for v in read[f"expert_tokens_{i}"]] for i in layers}
        imbalance = {name: max(counts) / (sum(counts) / len(counts)) if sum(counts) else 0.0
                     for name, counts in tokens.items()}
        entropy = {f"layer{i}": read[f"router_entropy_{i}"] / max(1.0, read[f"router_rows_{i}"]) for i in layers}
        figures.update({f"{prefix}aux_loss": read["aux_loss"] / read["micro_batches"],
                        f"{prefix}expert_imbalance_max": max(imbalance.values(), default=0.0)})
        if not prefix:
            figures.update(expert_tokens=tokens, expert_imbalance=imbalance, router_entropy=entropy)
        return figures


def balanced(loss_fn, model: torch.nn.Module, coef: float | None, say: Callable[[str], None]):
    """`loss_fn` with the router's load balancing for an MoE model (coef None: the model config's), said;
    a dense model's loss unchanged."""
    shape = moe_shape(model.config)
    if shape is None:
        return loss_fn
    coef = shape.aux_loss_coef if coef is None else coef
    say(f"Mixture of experts: {shape.experts} experts, top-{shape.top_k} per token; router load-balancing loss x "
        f"{coef:g} added to the training loss (--router_aux_loss_coef; val_loss is the cross-entropy alone); "
        "tokens per expert, load imbalance and router entropy per layer in metrics.jsonl")
    return RouterBalance(loss_fn, shape, coef)


def line_text(record: dict[str, Any]) -> str:
    """An MoE run's part of a training log line."""
    if "aux_loss" not in record:
        return ""
    return f" | aux_loss {record['aux_loss']:.4f} | expert load max/mean {record['expert_imbalance_max']:.2f}"


REPORT = Report(
    columns=(Column("expert_imbalance_max", "expert load max/mean (last)",
                    lambda lines, measured: next((l["expert_imbalance_max"] for l in reversed(lines)
                                                  if "expert_imbalance_max" in l), None), "{:.2f}".format),),
    curves=(Curve("expert_load.png", "Expert load (fullest layer)", "fullest expert's tokens / mean", "step",
                  ("expert_imbalance_max", "training"), ("val_expert_imbalance_max", "held-out")),))
