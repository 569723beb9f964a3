"""Which keys of a DeepSpeed JSON DeepSpeed reads: every other key is a one-line error, not a silent no-op.

DeepSpeed ignores keys it does not know at the top level and in the sections it reads key by key
(`pipeline`, `optimizer`, `scheduler`, `checkpoint`, ...), so a misspelt or misplaced key
(`pipeline.stage`, `lr` beside `optimizer`, `optimizer.lr`) trains as if it were absent. The
JSON is read here the way DeepSpeed reads it, by DeepSpeed's own config class, through a dict
that records each key asked for; what was never asked for is named with the closest key that
is. Sections handed whole to a typed (pydantic) model count as read: the model refuses unknown
fields itself. DeepSpeed copies the `pipeline` section whole onto its defaults, so there the
defaults' keys are the known ones.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator

from gpt_recipes.errors import UserError


class _Keys:
    """A recording dict's keys() view: `key in view` records that key; iterating records them all."""

    def __init__(self, owner: "_Recording"):
        self.owner = owner

    def __contains__(self, key: object) -> bool:
        self.owner._asked(key)
        return dict.__contains__(self.owner, key)

    def __iter__(self) -> Iterator[str]:
        self.owner._asked_all()
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return dict.__len__(self.owner)


class _Recording(dict):
    """A JSON object that records which of its keys are read (sections recorded under their path)."""

    def __init__(self, data: dict[str, Any], path: str, read: set[str]):
        super().__init__({k: _Recording(v, f"{path}{k}.", read) if isinstance(v, dict) else v for k, v in data.items()})
        self._path, self._read = path, read

    def _asked(self, key: object) -> None:
        self._read.add(f"{self._path}{key}")

    def _asked_all(self) -> None:
        for key in dict.keys(self):
            self._asked(key)

    def get(self, key, default=None):
        self._asked(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._asked(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._asked(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self._asked(key)
        return super().pop(key, *default)

    def setdefault(self, key, default=None):
        self._asked(key)
        return super().setdefault(key, default)

    def keys(self):
        return _Keys(self)

    def items(self):
        self._asked_all()
        return super().items()

    def values(self):
        self._asked_all()
        return super().values()

    def __iter__(self):
        self._asked_all()
        return super().__iter__()

    def __copy__(self) -> "_Recording":  # DeepSpeed copies the JSON before reading it: the copy records too
        copied = _Recording.__new__(_Recording)
        for key in dict.keys(self):  # read without recording (dict.update would ask keys())
            dict.__setitem__(copied, key, dict.__getitem__(self, key))
        copied._path, copied._read = self._path, self._read
        return copied


def _paths(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, its section) of every key, sections first."""
    for key, value in node.items():
        yield f"{prefix}{key}", node
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


def _pipeline_keys() -> set[str]:
    from deepspeed.runtime.config import get_pipeline_config

    return {f"pipeline.{key}" for key in get_pipeline_config({})}


# Keys these recipes read themselves (DeepSpeed reads them from its process groups, not the JSON).
RECIPE_KEYS = {"sequence_parallel_size"}


def unread_keys(cfg: dict[str, Any]) -> tuple[list[str], set[str]]:
    """(the dotted paths of the JSON's keys DeepSpeed never reads, outermost first; every key path
    DeepSpeed asked for, held or not)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    read: set[str] = set(RECIPE_KEYS)
    probe = {k: v for k, v in cfg.items() if k != "train_batch_size"}  # checked against the real world size already
    DeepSpeedConfig(_Recording(probe, "", read))
    known_pipeline = _pipeline_keys()
    unread = []
    for path, _ in _paths(probe):
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if any(u == parent or parent.startswith(f"{u}.") for u in unread):
            continue  # inside a section that is unread itself: the section is named
        if path.startswith("pipeline."):
            if path.count(".") == 1 and path not in known_pipeline:
                unread.append(path)
        elif path.startswith(("optimizer.params.", "scheduler.params.")):
            continue  # handed to the optimizer's and scheduler's constructors: checked against their signatures
        elif path not in read and not any(path.startswith(f"{r}.") for r in _whole(read, probe)):
            unread.append(path)
    return unread, read | known_pipeline


def _whole(read: set[str], cfg: dict[str, Any]) -> set[str]:
    """Sections taken whole: asked for, then read all at once or handed as they are to a typed model
    (which refuses fields it does not know), rather than key by key."""
    whole = set()
    for path, _ in _paths(cfg):
        node: Any = cfg
        for part in path.split("."):
            node = node[part]
        if isinstance(node, dict) and path in read:
            # Read key by key if any key was asked for, even one the JSON does not hold.
            by_key = any(r.startswith(f"{path}.") for r in read)
            if not by_key or all(f"{path}.{k}" in read for k in node):
                whole.add(path)
    return whole


def known_near(path: str, asked: set[str], unread: list[str]) -> str | None:
    """The closest key to `path` that DeepSpeed asks for: at its level, or for a learning-rate-like key
    beside the optimizer (or scheduler), as one of its params."""
    leaf, section = path.rsplit(".", 1)[-1], path.rsplit(".", 1)[0] if "." in path else ""
    if section in ("", "optimizer") and leaf in ("lr", "betas", "eps", "weight_decay"):
        return f"optimizer.params.{leaf}"
    if section == "scheduler" and leaf not in ("type", "params"):
        return f"scheduler.params.{leaf}"
    level = sorted(a for a in asked - set(unread) if (a.rsplit(".", 1)[0] if "." in a else "") == section)
    close = difflib.get_close_matches(path, level, n=1, cutoff=0.75)
    return close[0] if close else None


def check_keys(cfg: dict[str, Any]) -> None:
    """Every key of the JSON is one DeepSpeed reads; else one line naming it and the closest known key."""
    unread, asked = unread_keys(cfg)
    if not unread:
        return
    near = known_near(unread[0], asked, unread)
    raise UserError(f"DeepSpeed config: {unread[0]} is not a key DeepSpeed reads, so it would change nothing"
                    + (f"; did you mean {near}?" if near else "; see ds_configs/ for the keys these recipes use"))
