"""The run folder's names and paths: every file the recipes write in it, checkpoint tags, `latest`,
and which checkpoint a resume or an export takes.

    OUT/
      config.json           the resolved run configuration (RUN_CONFIG)
      metrics.jsonl         one JSON line per logging interval and evaluation (METRICS)
      checkpoints/          CHECKPOINTS
        latest              the tag to resume from, written last (LATEST)
        step<N>/            one checkpoint: DeepSpeed's shards, rng_state_rank<r>.pt, the model
                            config and tokenizer, and training.json, its completion mark (TRAINING_INFO)
        step<N>_universal/  the same in DeepSpeed's universal format, made for a resume on another layout
      monitor/              DeepSpeed's TensorBoard / CSV monitors (MONITOR)
      export_check.pt       the logits an export is verified against (EXPORT_CHECK)
      reference_logps.pt    DPO's stored reference log-probabilities (REFERENCE_LOGPS)
      .run.lock             held by the run's rank 0 (LOCK)

Everything else asks this module for these names and paths.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_recipes.errors import UserError
from gpt_recipes.folders import fsync_path

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MONITOR = "monitor"
EXPORT_CHECK = "export_check.pt"
REFERENCE_LOGPS = "reference_logps.pt"
LOCK = ".run.lock"
# What a run writes into its folder: a fresh start over an earlier run replaces exactly these.
RUN_OUTPUTS = (CHECKPOINTS, METRICS, RUN_CONFIG, MONITOR, EXPORT_CHECK, REFERENCE_LOGPS)

LATEST = "latest"
BEST = "best"  # the complete checkpoint with the best value of the run's best metric (BestMetric) at its step
# Plain-JSON facts about the run that tools read without loading any tensor file.
TRAINING_INFO = "training.json"
MODEL_CONFIG = "config.json"  # in a tag folder: the model's Hugging Face config


@dataclass(frozen=True)
class BestMetric:
    """The evaluation figure that ranks checkpoints (`best` names the best so far); an objective names its own."""

    key: str = "val_loss"
    higher_is_better: bool = False

    def better(self, value: float, than: float | None) -> bool:
        if than is None or not math.isfinite(than):
            return True
        return value > than if self.higher_is_better else value < than

    def describe(self) -> str:
        return f"{'highest' if self.higher_is_better else 'lowest'} {self.key}"


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def rng_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_state_rank{rank}.pt"


def tag_for(step: int) -> str:
    return f"step{step}"


def is_complete(tag_dir: Path) -> bool:
    # training.json is written by rank 0 after every rank has written (and flushed) its shards.
    return (tag_dir / TRAINING_INFO).is_file()


def _step_of(tag_dir: Path) -> int:
    return saved_info(tag_dir.parent, tag_dir.name)["step"]


def _latest_file_tag(ckpt_dir: Path) -> str | None:
    """What `latest` names; "<unreadable>" when it holds bytes that are no tag name."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    try:
        named = latest.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError):
        return UNREADABLE
    return named if re.fullmatch(r"[\w.-]+", named) else UNREADABLE


UNREADABLE = "<unreadable>"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, if that checkpoint is there and complete."""
    tag = _latest_file_tag(ckpt_dir)
    return tag if tag and is_complete(ckpt_dir / tag) else None


def best_tag(ckpt_dir: Path) -> str | None:
    """The tag `best` names, if that checkpoint is there and complete."""
    best = Path(ckpt_dir) / BEST
    try:
        tag = best.read_text().strip() if best.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag and re.fullmatch(r"[\w.-]+", tag) and is_complete(Path(ckpt_dir) / tag) else None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete step<N> checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name) and is_complete(p)]
    return [p.name for p in sorted(found, key=_step_of)]


def resume_tag(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(the checkpoint to resume from, a note when it is not the one `latest` names).

    `latest` wins when it names a complete checkpoint (a user may point it at an older step
    to roll back). When it is missing, or names a folder that was deleted or never finished,
    the newest complete checkpoint is taken instead, and the note says so.
    """
    tag = latest_tag(ckpt_dir)
    if tag is not None:
        return tag, None
    complete = complete_tags(ckpt_dir)
    if not complete:
        return None, None
    named = _latest_file_tag(ckpt_dir)
    why = (f"'{LATEST}' holds no tag name (damaged)" if named == UNREADABLE
           else f"'{LATEST}' names {named}, which is missing or incomplete" if named
           else f"there is no '{LATEST}' file")
    return complete[-1], f"{why}: resuming from the newest complete checkpoint, {complete[-1]}"



def write_latest(ckpt_dir: Path, tag: str, name: str = LATEST) -> None:
    """Point `latest` (or `best`) at `tag`, atomically."""
    tmp = ckpt_dir / f".{name}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / name)
    fsync_path(ckpt_dir)  # the rename itself



def saved_info(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The plain-JSON facts a complete checkpoint records (step, layout, precision, schedule)."""
    return json.loads((ckpt_dir / tag / TRAINING_INFO).read_text())



def recorded_info(tag_dir: Path) -> dict[str, Any]:
    """A tag folder's training.json, or {} for a checkpoint these recipes did not write."""
    info = tag_dir / TRAINING_INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def damage(tag_dir: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its training.json
    recorded at save time (None: intact, or a checkpoint from before sizes were recorded)."""
    try:
        files = recorded_info(tag_dir).get("files") or {}
    except (ValueError, OSError):
        return f"its {TRAINING_INFO} is not readable JSON"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)"
    return None


def check_intact(tag_dir: Path, how: str) -> None:
    """Stop with one line naming the damaged file and the newest intact checkpoint beside it; `how`
    says what to do with that one ("{tag}" and "{ckpt_dir}" are filled in)."""
    problem = damage(tag_dir)
    if problem is None:
        return
    good = [t for t in complete_tags(tag_dir.parent) if t != tag_dir.name and damage(tag_dir.parent / t) is None]
    hint = (f"the newest intact checkpoint is {good[-1]}: " + how.format(tag=good[-1], ckpt_dir=tag_dir.parent)
            if good else "no intact checkpoint is left beside it")
    raise UserError(f"checkpoint {tag_dir} is damaged: {problem}; {hint}")


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def _is_tag_dir(path: Path) -> bool:
    # ZeRO-3 names its model-states files zero_pp_rank_<r>_mp_rank_00_model_states.pt.
    return path.is_dir() and any(path.glob("*mp_rank_00_model_states.pt"))


def training_folder_kind(path: str | Path) -> str | None:
    """What kind of training folder `path` is ("a run folder", "a checkpoints folder", "a
    checkpoint"), or None: such folders hold a config.json and a tokenizer too, but no weights a
    model loader can read."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CHECKPOINTS).is_dir():
        return "a run folder"
    if (path / LATEST).is_file() or any(_is_tag_dir(p) for p in path.iterdir() if p.is_dir()):
        return "a checkpoints folder"
    if (path / TRAINING_INFO).is_file() or _is_tag_dir(path):
        return "a training checkpoint"
    return None


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run folder, a checkpoints folder or a tag folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist or is not a folder")
    if (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    elif _is_tag_dir(path) and tag is None:
        return path.parent, path.name
    tags = sorted(p.name for p in path.iterdir() if _is_tag_dir(p))
    if not tags:
        raise UserError(f"{path} is not a DeepSpeed checkpoint folder (no '{LATEST}' and no step folders)")
    if tag == BEST:
        tag = best_tag(path)
        if tag is None:
            raise UserError(f"{path} has no '{BEST}' checkpoint (none was saved at a step with a validation pass); "
                            f"pass --tag (one of: {', '.join(tags)})")
    if tag is None:
        tag = latest_tag(path)
        if tag is None:
            raise UserError(f"{path} has no '{LATEST}' tag; pass --tag (one of: {', '.join(tags)})")
    if tag not in tags:
        raise UserError(f"{path} holds no checkpoint tagged {tag!r} (available: {', '.join(tags)})")
    return path, tag
