"""Weighted mixtures of data sources: prepared folders for pretraining, files for fine-tuning.

Global batch s takes q_k(s) samples from source k. The counts follow the weights as closely as
whole samples allow: each step hands out the global batch by largest remainder on every
source's running shortfall against its share, so after any step the samples taken from a
source differ from weight x samples seen by less than one. Each source walks through its own
per-epoch permutation of its windows, re-permuted when it runs out, and the batch is
shuffled so that every rank's part mixes the sources. All of it depends on the seed and the
global batch alone: any number of ranks or accumulation steps sees the same global batches,
and resuming at step s needs nothing but s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpt_recipes.data import tokenizer
from gpt_recipes.data.samples import Samples
from gpt_recipes.data.tokens import DataMeta, GlobalBatchOrder, PackedTokens, eval_micro_batches
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError


@dataclass(frozen=True)
class Source:
    name: str  # the folder's name: the key of source_tokens and val_loss_by_source
    meta: DataMeta


def tokenizer_digest(meta: DataMeta) -> str:
    return tokenizer.digest(meta.tokenizer_dir)


def normalise_weights(weights: list[float], count: int, what: str) -> list[float]:
    """The sampling weights of `count` sources, normalised to sum to 1 (equal when none are given)."""
    if weights and len(weights) != count:
        raise UserError(f"--data_weights gives {len(weights)} weights for {count} {what}; give one per source, "
                        "or none for equal weights")
    if weights and count == 1:
        raise UserError(f"--data_weights weighs several {what}; one was given")
    bad = [w for w in weights if not w > 0]
    if bad:
        raise UserError(f"--data_weights must all be positive, got {bad[0]:g}")
    total = sum(weights) if weights else count
    return [w / total for w in weights] if weights else [1 / count] * count


def check_sources(metas: list[DataMeta], weights: list[float]) -> tuple[list[Source], list[float]]:
    """Sources named after their folders, made with one tokenizer, and the normalised weights."""
    normalised = normalise_weights(weights, len(metas), "--data folders")
    names = [Path(m.root).resolve().name for m in metas]
    if len(set(names)) != len(names):
        raise UserError(f"--data: two folders share the name {next(n for n in names if names.count(n) > 1)!r}; "
                        "the name keys each source's metrics, so give them distinct names")
    first = tokenizer_digest(metas[0])
    for meta in metas[1:]:
        if tokenizer_digest(meta) != first:
            raise UserError(f"--data: {metas[0].root} and {meta.root} were prepared with different tokenizers "
                            f"({metas[0].raw.get('tokenizer_source', '?')} / {meta.raw.get('tokenizer_source', '?')}); "
                            "prepare every source with the same --tokenizer folder")
    return [Source(n, m) for n, m in zip(names, metas)], normalised


class SourceIndex(Samples):
    """Several sources' samples as one index space: source k holds indices offsets[k] ..
    offsets[k] + sizes[k] - 1. Mixed sample sets carry it beside their own `batch`."""

    def index_sources(self, sizes: list[int], names: list[str]) -> None:
        self.sizes = [int(n) for n in sizes]
        self.source_names = tuple(names)
        self.offsets = np.cumsum([0] + self.sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right") - 1)


class MixedWindows(SourceIndex):
    """The windows of several prepared folders as one index space."""

    def __init__(self, splits: list[PackedTokens], names: list[str]):
        self.splits = splits
        self.seq_len = splits[0].seq_len
        self.index_sources([len(s) for s in splits], names)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        T = self.seq_len
        rows = []
        for i in indices:
            k = self.source_of(i)
            local = int(i - self.offsets[k])
            rows.append(self.splits[k].tokens[local * T : local * T + T + 1])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"input_ids": x[:, :-1]}, x[:, 1:]

    def num_tokens(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len

    def num_targets(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len


class MixtureOrder(GlobalBatchOrder):
    """Global batch s of a weighted mixture, as global indices into a SourceIndex."""

    def __init__(self, windows: SourceIndex, weights: list[float], plan: BatchPlan, seed: int,
                 on_new_epoch: Callable[[str, int, int], None] | None = None):
        empty = [n for n, size in zip(windows.source_names, windows.sizes) if size == 0]
        if empty:
            raise UserError(f"--data: source {empty[0]} holds no training sample at this seq_len")
        self.windows = windows
        self.weights = np.asarray(weights, dtype=np.float64)
        self.plan = plan
        self.seed = seed
        self.on_new_epoch = on_new_epoch
        self._taken = [np.zeros(len(weights), dtype=np.int64)]  # samples taken per source before step s
        self._announced: set[tuple[int, int]] = set()
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, its permutation)

    def taken_before(self, step: int) -> np.ndarray:
        """Samples taken from each source by steps 0 .. step - 1."""
        G = self.plan.global_batch
        while len(self._taken) <= step:
            s = len(self._taken) - 1
            taken = self._taken[-1]
            want = self.weights * (s + 1) * G - taken  # each source's shortfall after this step
            quota = np.floor(want).astype(np.int64).clip(min=0)
            left = G - int(quota.sum())
            # Largest remainders first; ties go to the earlier source, so the order is fixed.
            order = sorted(range(len(want)), key=lambda k: (-(want[k] - quota[k]), k))
            for k in order[:left]:
                quota[k] += 1
            self._taken.append(taken + quota)
        return self._taken[step]

    def source_tokens(self, step: int) -> dict[str, int]:
        """Training tokens read from each source by steps 0 .. step - 1 (windows are all seq_len long)."""
        return {name: int(n) * self.windows.seq_len for name, n in zip(self.windows.source_names, self.taken_before(step))}

    def source_counts(self, step: int) -> dict[str, dict[str, int]]:
        """What each source gave by steps 0 .. step - 1, for the metrics: tokens for windows of one
        length, else samples (fine-tuning examples vary in length)."""
        if isinstance(self.windows, MixedWindows):
            return {"source_tokens": self.source_tokens(step)}
        return {"source_samples": {name: int(n) for name, n in zip(self.windows.source_names,
                                                                     self.taken_before(step))}}

    def _walk(self, k: int, start: int, count: int, step: int) -> np.ndarray:
        """Source k's samples number start .. start + count - 1 of its epoch-by-epoch walk."""
        n = self.windows.sizes[k]
        positions = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // n):
            epoch = int(epoch)
            here = positions // n == epoch
            out[here] = self._permutation(k, epoch)[positions[here] % n]
            if epoch > 0 and (k, epoch) not in self._announced and start <= epoch * n and self.on_new_epoch:
                self._announced.add((k, epoch))
                self.on_new_epoch(self.windows.source_names[k], epoch, step)
        return out + self.windows.offsets[k]

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(k)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, k, epoch]).permutation(self.windows.sizes[k]))
            self._perms[k] = cached
        return cached[1]

    def global_batch(self, step: int) -> np.ndarray:
        before, after = self.taken_before(step), self.taken_before(step + 1)
        parts = [self._walk(k, int(before[k]), int(after[k] - before[k]), step) for k in range(len(before))]
        batch = np.concatenate(parts)
        return batch[np.random.default_rng([self.seed, 2**31, step]).permutation(len(batch))]


def val_micro_batches(val: SourceIndex, max_per_source: int, micro_batch: int, rank: int,
                      world_size: int) -> list[np.ndarray]:
    """Each source's validation samples in micro-batches of that source alone (so each
    micro-batch's loss belongs to one source); every rank runs as many as the others."""
    out = []
    for k, size in enumerate(val.sizes):
        for micro in eval_micro_batches(size, max_per_source, micro_batch, rank, world_size):
            out.append(micro + val.offsets[k])
    return out
