"""Named figures summed on the device between two log lines, read with one all-reduce.

A step adds what it measured under a name (`sums.add(kl=..., tokens=...)`); the tensors stay
on the device and nothing waits for them until `read()`, which stacks every name's total,
all-reduces the stack once over the ranks and hands back plain floats by name (one wait for
the device). Every rank must add the same names (the stack is reduced position by position;
names are sorted); a figure may be a vector, summed element by element. Figures every rank already holds alike (all-reduced or gathered by the
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

    def read(self) -> dict[str, float | list[float]]:
        """Every figure's total (a collective: every rank calls it), and start again: a number for a
        0-d figure, a list for a vector (e.g. tokens per expert)."""
        values = [*self._local.values(), *self._shared.values()]
        device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float64, device=device)  # noqa: E731
        local, shared = sorted(self._local), sorted(self._shared)
        shapes = [as_tensor(self._local[n]).shape for n in local] + [as_tensor(self._shared[n]).shape for n in shared]
        flat = lambda names, source: torch.cat([as_tensor(source[n]).reshape(-1) for n in names])  # noqa: E731
        parts = ([all_reduce(flat(local, self._local))] if local else []) + ([flat(shared, self._shared)] if shared else [])
        self._local, self._shared = {}, {}
        if not parts:
            return {}
        totals, out, at = torch.cat(parts).tolist(), {}, 0
        for name, shape in zip(local + shared, shapes):
            size = shape.numel()
            out[name] = totals[at] if not shape else totals[at : at + size]
            at += size
        return out
