"""What a mixture-of-experts config says of its experts, whatever its family.

transformers' MoE families (Mixtral, Qwen2/3-MoE, DeepSeek, ...) name their expert count and
top-k differently; `moe_shape` reads both, so the layout rules, the FLOP count, the planner and
the logged expert load need no family names elsewhere. The registry adapter lets DeepSpeed's
AutoEP run with transformers 5 (Layout.prepare_engine applies it when the JSON asks for AutoEP).
"""

from __future__ import annotations

import inspect
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


def registry_needs_adapter() -> bool:
    """True while transformers' output-recorder registry takes no default in `get` (transformers 5.x),
    where DeepSpeed 0.19.8's AutoEP calls `registry.get(key, default)` and sets entries by class name."""
    from transformers.utils import output_capturing

    registry = type(output_capturing._CAN_RECORD_REGISTRY)
    return registry is not dict and len(inspect.signature(registry.get).parameters) < 3


def adapt_output_recorder_registry() -> None:
    """Let the registry be read and written as DeepSpeed's AutoEP does (keys that are class names,
    `get` with a default) while transformers' own calls (keys that are models) mean what they did.
    The one registry object is re-classed in place, so every module that imported it sees the change."""
    if not registry_needs_adapter():
        return
    from transformers.utils import output_capturing

    base = type(output_capturing._CAN_RECORD_REGISTRY)

    class _NamesOrModels(base):
        _missing = object()

        def __setitem__(self, key, value):
            dict.__setitem__(self, key if isinstance(key, str) else str(key.__class__), value)

        def get(self, key, default=_missing):
            if not isinstance(key, str):
                return base.get(self, key)
            return dict.get(self, key) if default is self._missing else dict.get(self, key, default)

    output_capturing._CAN_RECORD_REGISTRY.__class__ = _NamesOrModels
