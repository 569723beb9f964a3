"""Packed token data: memory-mapped splits and a deterministic, rank-sharded batch order.

A prepared data folder holds each split's token stream (documents tokenised, each
followed by EOS, concatenated) in one or more shard files, plus `meta.json` (the index)
and the tokenizer; the shards are read in place as one stream. Sample i of a split is
the window tokens[i*T : i*T + T + 1]: inputs are its first T tokens, targets its last T.

The order of samples depends only on the data, the seed and the global batch size:
global batch s is a fixed slice of a per-epoch permutation, and rank r takes the r-th
contiguous part of it, split into micro-batches. So 2 ranks x micro-batch b, 1 rank x 2b
and 1 rank x b x 2 accumulation steps see exactly the same samples in every step, and
resuming at step s needs nothing but s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_recipes.data.samples import Samples
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
PART_FILE = re.compile(r"part-(\d{5})-of-(\d{5})\.json")


def part_name(index: int, num_shards: int) -> str:
    """The stem shared by one part's manifest and token files: part-00002-of-00004."""
    return f"part-{index:05d}-of-{num_shards:05d}"


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

    def shards(self, split: str) -> list[tuple[Path, int]]:
        """(file, token count) of each of the split's shards, in stream order. Folders from before
        sharding name one file per split."""
        entry = self.raw["splits"][split]
        listed = entry["shards"] if "shards" in entry else [entry]
        return [(self.root / shard["file"], shard["tokens"]) for shard in listed]

    def split_files(self, split: str) -> list[Path]:
        return [path for path, _ in self.shards(split)]

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
        shards = entry.get("shards", [entry]) if isinstance(entry, dict) else None
        if not (isinstance(shards, list) and shards and all(_is_shard(s) for s in shards) and _is_shard(
                {"file": "", **entry}) and sum(s["tokens"] for s in shards) == entry["tokens"]):
            return f"lacks the {split} split's files and token counts"
    return None


def _is_shard(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("tokens"), int)
            and entry["tokens"] >= 0)


def read_parts(root: Path) -> dict[int, dict]:
    """The finished parts in a data folder, {index: manifest}; one manifest that does not
    belong with the others (another preparation, another number of parts) is an error."""
    parts: dict[int, dict] = {}
    first = None
    for path in sorted(root.glob("part-*-of-*.json")):
        match = PART_FILE.fullmatch(path.name)
        try:
            manifest = json.loads(path.read_text()) if match else None
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or "preparation" not in manifest:
            raise UserError(f"{path} is not a part manifest written by tools/prepare_data.py; remove it")
        if first is None:
            first = manifest
        elif (manifest["preparation"], manifest.get("num_shards")) != (first["preparation"], first.get("num_shards")):
            raise UserError(f"{path.name} in {root} comes from another preparation than {part_name(*_where(first))}"
                            ".json (other inputs, options, tokenizer or number of parts); prepare that part again "
                            "with the same flags, or use another folder")
        parts[int(match.group(1))] = manifest
    return parts


def _where(manifest: dict) -> tuple[int, int]:
    return manifest["shard_index"], manifest["num_shards"]


def index_from_parts(root: Path, parts: dict[int, dict], fingerprint: str | None = None) -> dict:
    """The folder's index (meta.json) from its parts: all of them must be there."""
    num_shards = next(iter(parts.values()))["num_shards"]
    missing = [i for i in range(num_shards) if i not in parts]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"data folder {root} holds {len(parts)} of its {num_shards} parts; missing: {shown}. Prepare "
                        f"each with tools/prepare_data.py --num_shards {num_shards} --shard_index I and the same "
                        "flags, and copy it into the folder")
    ordered = [parts[i] for i in range(num_shards)]
    meta = {k: v for k, v in ordered[0].items() if k not in ("shard_index", "splits", "fingerprint")}
    meta["fingerprint"] = fingerprint
    meta["splits"] = {split: {"tokens": sum(p["splits"][split]["tokens"] for p in ordered),
                              "documents": sum(p["splits"][split]["documents"] for p in ordered),
                              "shards": [{k: p["splits"][split][k] for k in ("file", "tokens")} for p in ordered]}
                      for split in SPLITS}
    return meta


def read_meta(root: str | Path) -> DataMeta:
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; prepare it with tools/prepare_data.py")
    meta_path = root / META_FILE
    parts = read_parts(root) if root.is_dir() else {}
    if not meta_path.is_file() and not parts:
        raise UserError(f"data folder {root} has no {META_FILE}; prepare it with tools/prepare_data.py")
    if not meta_path.is_file():
        raw = index_from_parts(root, parts)  # parts gathered by copying: the listing is the index
    else:
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{meta_path} is not valid JSON ({err.msg} at line {err.lineno}); prepare the folder "
                            "again with tools/prepare_data.py")
    problem = _meta_problem(raw)
    if problem:
        raise UserError(f"{meta_path} {problem}; prepare the folder again with tools/prepare_data.py")
    meta = DataMeta(root, raw)
    if not (meta.tokenizer_dir / "tokenizer_config.json").is_file():
        raise UserError(f"data folder {root} has no tokenizer in {TOKENIZER_DIR}/; prepare it again with "
                        "tools/prepare_data.py")
    foreign = [i for i, part in parts.items() if part["preparation"] != raw.get("preparation")]
    if foreign:
        raise UserError(f"{part_name(foreign[0], parts[foreign[0]]['num_shards'])} in {root} comes from another "
                        f"preparation than the folder's {META_FILE}; copy in the part prepared with the same flags")
    for split in SPLITS:
        for path, tokens in meta.shards(split):
            if not path.is_file():
                raise UserError(f"data folder {root} is missing {path.name}; prepare it again with "
                                "tools/prepare_data.py (a sharded folder: that part, with the same flags)")
            if path.stat().st_size != tokens * meta.dtype.itemsize:
                raise UserError(f"{path} is truncated or corrupt (size does not match {META_FILE}); prepare it again")
    return meta


class TokenStream:
    """A split's shard files read as one token stream, memory-mapped in place (never copied)."""

    def __init__(self, paths: list[Path], dtype: np.dtype):
        self.parts = [np.memmap(p, dtype=dtype, mode="r") for p in paths if Path(p).stat().st_size]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(len(self))
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:  # a window may span the end of one shard and the start of the next
            part_stop = min(stop, int(self.starts[k + 1]))
            pieces.append(self.parts[k][start - self.starts[k] : part_stop - self.starts[k]])
            start, k = part_stop, k + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, np.uint16)


class PackedTokens(Samples):
    """One split's token stream cut into windows of seq_len + 1 tokens."""

    def __init__(self, paths: list[Path], dtype: np.dtype, seq_len: int):
        self.tokens = TokenStream(paths, dtype)
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

    def source_counts(self, step: int) -> dict[str, dict[str, int]]:
        """What each source gave by steps 0 .. step - 1, for the metrics (one source: nothing)."""
        return {}


def eval_micro_batches(num_samples: int, max_samples: int, micro_batch: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The validation samples rank `rank` evaluates, in micro-batches.

    The evaluated set is the first min(num_samples, max_samples) windows, rounded down to a
    multiple of the world size so every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively in each one).
    """
    count = min(num_samples, max_samples) // world_size * world_size
    mine = np.arange(count, dtype=np.int64)[rank::world_size]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
