"""What a mixture-of-experts config says of its experts, whatever its family.

transformers' MoE families (Mixtral, Qwen2/3-MoE, DeepSeek, ...) name their expert count and
top-k differently; `moe_shape` reads both, so the layout rules, the FLOP count, the planner and
the logged expert load need no family names elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

# (config field for the number of routed experts, for the experts each token goes to), by family.
_EXPERT_FIELDS = (("num_local_experts", "num_experts_per_tok"), ("num_experts", "num_experts_per_tok"),
                  ("n_routed_experts", "num_experts_per_tok"))


@dataclass(frozen=True)
class MoEShape:
    experts: int  # routed experts per MoE layer
    top_k: int  # experts each token is sent to
    aux_loss_coef: float  # the router's load-balancing loss weight in the config

    @property
    def active_fraction(self) -> float:
        return self.top_k / self.experts


def moe_shape(config) -> MoEShape | None:
    """The config's experts, or None for a dense model."""
    for experts_field, top_k_field in _EXPERT_FIELDS:
        experts, top_k = getattr(config, experts_field, None), getattr(config, top_k_field, None)
        if isinstance(experts, int) and experts > 1 and isinstance(top_k, int):
            return MoEShape(experts, top_k, float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))
    return None
