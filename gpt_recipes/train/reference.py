"""The reference model's log-probabilities, computed once and stored with the run (DPO, KTO).

The reference is the starting model. It is never held as a second model: before the first
step, the engine (still at the starting weights; with LoRA the adapters start at zero, so it is
the base) scores both sequences of every sample of the training and held-out sets once, and
the scores go to OUTPUT_DIR/reference_logps.pt keyed to the data, the model and the precision;
--resume reuses them after checking the key.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpt_recipes import console
from gpt_recipes.checkpoints.paths import REFERENCE_LOGPS
from gpt_recipes.ds_config import precision
from gpt_recipes.errors import UserError
from gpt_recipes.models.adapters import weights_fingerprint
from gpt_recipes.parallel.distributed import all_reduce
from gpt_recipes.train.preference import PreferenceSamples, sequence_logps


@torch.no_grad()
def reference_logps(engine, samples: PreferenceSamples, micro_batch: int, rank: int, world_size: int,
                    progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """(samples, 2) summed log-probabilities of both sequences under the engine's model, each rank
    scoring a strided share; every rank runs the same number of forwards (ZeRO-3 gathers in each)."""
    total = len(samples)
    per_rank = math.ceil(total / world_size)
    out = torch.zeros(total, 2, dtype=torch.float64, device=engine.device)
    engine.eval()
    reference, samples.reference = samples.reference, None
    for start in range(0, per_rank, micro_batch):
        mine = np.arange(rank + start * world_size, rank + min(start + micro_batch, per_rank) * world_size,
                         world_size)
        real = mine[mine < total]
        idx = real if len(real) else np.array([0])  # a rank with nothing left still joins the forward
        inputs, targets = samples.batch(idx)
        device = engine.device
        logps = sequence_logps(engine, {k: v.to(device) for k, v in inputs.items()}, targets.to(device))
        if len(real):
            out[torch.as_tensor(real, device=device)] = logps.double().view(2, -1).T[: len(real)]
        progress(min(len(idx) * world_size, total - start * world_size))
    samples.reference = reference
    engine.train()
    return all_reduce(out).cpu()


def reference_fingerprint(model_fingerprint: str, precision: str, train: PreferenceSamples,
                          val: PreferenceSamples) -> str:
    """What stored reference log-probabilities belong to: the starting model, the precision it
    ran in, and every sample's tokens."""
    parts = [model_fingerprint, precision, train.fingerprint(), val.fingerprint()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_reference(out_dir: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Stored reference log-probabilities of a run being resumed, checked to be of this data and model."""
    from gpt_recipes.checkpoints.saving import load_own

    path = out_dir / REFERENCE_LOGPS
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing, and the starting model it was computed with is gone; "
                        "start the run again with --overwrite")
    stored = load_own(path)
    if stored.get("fingerprint") != fingerprint:
        raise UserError(f"--resume: {path} holds reference log-probabilities of other data or another starting "
                        "model (or precision) than this run's; resume with the same --data, --val_data, "
                        "--model_name_or_path, length flags and DeepSpeed precision")
    return stored


def save_reference(out_dir: Path, fingerprint: str, train: torch.Tensor, val: torch.Tensor) -> None:
    from gpt_recipes.folders import fsync_path

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{REFERENCE_LOGPS}.tmp"
    torch.save({"fingerprint": fingerprint, "train": train, "val": val}, tmp)
    fsync_path(tmp)
    tmp.replace(out_dir / REFERENCE_LOGPS)


class StoredReference:
    """The reference scores of a run's training and held-out samples: checked (on resume, loaded)
    before any rank starts, computed or reused once the engine exists."""

    def __init__(self, run, train: PreferenceSamples, val: PreferenceSamples, model_name_or_path: str,
                 adapted: bool, noun: str = "pairs"):
        self.train, self.val, self.adapted, self.noun = train, val, adapted, noun
        self.fingerprint = reference_fingerprint(weights_fingerprint(model_name_or_path), precision(run.ds_cfg),
                                                 train, val)
        self.stored = load_reference(run.out_dir, self.fingerprint) if run.output.resume_tag else None

    def attach(self, engine, run) -> None:
        """Give both sample sets their reference scores: stored ones on resume, else one pass of the
        engine (at the starting weights) over them."""
        path = run.out_dir / REFERENCE_LOGPS
        if self.stored is not None:
            run.say(f"Reference log-probabilities: reusing {path} (same data, model and precision)")
            self.train.reference, self.val.reference = self.stored["train"], self.stored["val"]
            return
        run.say(f"Reference log-probabilities: one pass of the starting model over {len(self.train)} + "
                f"{len(self.val)} {self.noun} before the first step, stored in {path} (no second model is held"
                + ("; the adapters start at zero, so this is the base model" if self.adapted else "") + ")")
        scored = []
        for what, samples in (("train", self.train), ("val", self.val)):
            with console.Progress(len(samples), f"reference log-probabilities ({what})", self.noun[:-1],
                                  show=run.env.is_main) as bar:
                scored.append(reference_logps(engine, samples, run.batch.micro_batch, run.env.rank,
                                              run.env.world_size, progress=bar.update))
        if run.env.is_main:
            save_reference(run.out_dir, self.fingerprint, *scored)
        self.train.reference, self.val.reference = scored
