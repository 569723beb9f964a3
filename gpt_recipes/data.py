"""Packed token data: memory-mapped splits and a deterministic, rank-sharded batch order.

A prepared data folder holds `train.bin` and `val.bin` (documents tokenised, each
followed by EOS, concatenated) plus `meta.json` and the tokenizer. Sample i of a split
is the window tokens[i*T : i*T + T + 1]: inputs are its first T tokens, targets its last T.

The order of samples depends only on the data, the seed and the global batch size:
global batch s is a fixed slice of a per-epoch permutation, and rank r takes the r-th
contiguous part of it, split into micro-batches. So 2 ranks x micro-batch b, 1 rank x 2b
and 1 rank x b x 2 accumulation steps see exactly the same samples in every step, and
resuming at step s needs nothing but s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ds_config import BatchPlan
from .errors import UserError

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class DataMeta:
    root: Path
    raw: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.raw["dtype"])

    @property
    def vocab_size(self) -> int:
        return self.raw["vocab_size"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def split_path(self, split: str) -> Path:
        return self.root / self.raw["splits"][split]["file"]

    def split_tokens(self, split: str) -> int:
        return self.raw["splits"][split]["tokens"]


# Token files hold unsigned ids: 16 bits for vocabularies up to 65536, else 32.
TOKEN_DTYPES = ("uint16", "uint32")


def _meta_problem(raw: Any) -> str | None:
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(raw, dict):
        return "is not a JSON object"
    if raw.get("dtype") not in TOKEN_DTYPES:
        return f"gives the token dtype as {raw.get('dtype')!r}, not one of {', '.join(TOKEN_DTYPES)}"
    splits = raw.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("tokens"), int) and entry["tokens"] >= 0):
            return f"lacks the {split} split's file and token count"
    return None


def read_meta(root: str | Path) -> DataMeta:
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; prepare it with tools/prepare_data.py")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise UserError(f"data folder {root} has no {META_FILE}; prepare it with tools/prepare_data.py")
    try:
        raw = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path} is not valid JSON ({err.msg} at line {err.lineno}); prepare the folder again "
                        "with tools/prepare_data.py")
    problem = _meta_problem(raw)
    if problem:
        raise UserError(f"{meta_path} {problem}; prepare the folder again with tools/prepare_data.py")
    meta = DataMeta(root, raw)
    if not (meta.tokenizer_dir / "tokenizer_config.json").is_file():
        raise UserError(f"data folder {root} has no tokenizer in {TOKENIZER_DIR}/; prepare it again with "
                        "tools/prepare_data.py")
    for split in SPLITS:
        path = meta.split_path(split)
        if not path.is_file():
            raise UserError(f"data folder {root} is missing {path.name}; prepare it again with tools/prepare_data.py")
        if path.stat().st_size != meta.split_tokens(split) * meta.dtype.itemsize:
            raise UserError(f"{path} is truncated or corrupt (size does not match {META_FILE}); prepare it again")
    return meta


class PackedTokens:
    """One split's token stream, memory-mapped, cut into windows of seq_len + 1 tokens."""

    def __init__(self, path: Path, dtype: np.dtype, seq_len: int):
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({"input_ids": first T tokens of each window}, the last T tokens as targets)."""
        T = self.seq_len
        windows = np.stack([self.tokens[i * T : i * T + T + 1] for i in indices]).astype(np.int64)
        x = torch.from_numpy(windows)
        return {"input_ids": x[:, :-1]}, x[:, 1:]

    def num_tokens(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len

    def num_targets(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len


class GlobalBatchOrder:
    """Which samples make up global batch `step`, and which part of it each rank reads."""

    def __init__(self, num_samples: int, plan: BatchPlan, seed: int):
        if num_samples < plan.global_batch:
            raise UserError(
                f"the training split holds {num_samples} samples, fewer than one global batch of "
                f"{plan.global_batch}; use more data, a shorter --seq_len or a smaller batch"
            )
        self.num_samples = num_samples
        self.plan = plan
        self.seed = seed
        self.batches_per_epoch = num_samples // plan.global_batch
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.batches_per_epoch)
        size = self.plan.global_batch
        return self._permutation(epoch)[index * size : (index + 1) * size]

    def micro_batch(self, step: int, rank: int, micro_step: int) -> np.ndarray:
        per_rank, micro = self.plan.per_rank, self.plan.micro_batch
        mine = self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        return mine[micro_step * micro : (micro_step + 1) * micro]


def eval_micro_batches(num_samples: int, max_samples: int, micro_batch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The validation samples rank `rank` evaluates, in micro-batches.

    The evaluated set is the first min(num_samples, max_samples) windows, rounded down to a
    multiple of the world size so every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively in each one).
    """
    count = min(num_samples, max_samples) // world_size * world_size
    mine = np.arange(count, dtype=np.int64)[rank::world_size]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
