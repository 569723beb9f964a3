"""Named figures summed on the device between two log lines, read with one all-reduce.

A step adds what it measured under a name (`sums.add(kl=..., tokens=...)`); the tensors stay
on the device and nothing waits for them until `read()`, which stacks every name's total,
all-reduces the stack once over the ranks and hands back plain floats by name (one wait for
the device). Every rank must add the same names (the stack is reduced position by position;
names are sorted). Figures every rank already holds alike (all-reduced or gathered by the
step anyway) are added with `add_shared` and not reduced again: summing them over ranks would
count them once per rank.
"""

from __future__ import annotations

import torch

from gpt_recipes.parallel.distributed import all_reduce

Figure = torch.Tensor | float


def _accumulate(into: dict[str, Figure], figures: dict[str, Figure]) -> None:
    for name, value in figures.items():
        value = value.detach().double() if torch.is_tensor(value) else float(value)
        into[name] = into[name] + value if name in into else value


class DeviceSums:
    def __init__(self) -> None:
        self._local: dict[str, Figure] = {}
        self._shared: dict[str, Figure] = {}

    def add(self, **figures: Figure) -> None:
        """This rank's part of each figure (a 0-d tensor on the device, or a host number)."""
        _accumulate(self._local, figures)

    def add_shared(self, **figures: Figure) -> None:
        """Figures every rank holds alike (summed over steps, not over ranks)."""
        _accumulate(self._shared, figures)

    def __bool__(self) -> bool:
        return bool(self._local or self._shared)

    def read(self) -> dict[str, float]:
        """Every figure's total (a collective: every rank calls it), and start again."""
        values = [*self._local.values(), *self._shared.values()]
        device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
        stack = lambda names, source: torch.stack([torch.as_tensor(source[n], dtype=torch.float64,  # noqa: E731
                                                                   device=device) for n in names])
        local, shared = sorted(self._local), sorted(self._shared)
        parts = ([all_reduce(stack(local, self._local))] if local else []) + (
            [stack(shared, self._shared)] if shared else [])
        self._local, self._shared = {}, {}
        return dict(zip(local + shared, torch.cat(parts).tolist())) if parts else {}
