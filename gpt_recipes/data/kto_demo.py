"""The KTO demo's rows: the DPO demo's pairs unpaired (TRL's unpair_preference_dataset does the same),
each pair a desirable row (its chosen answer, label true) and an undesirable one (its rejected
answer, label false), shuffled so that neighbouring rows (which KTO's KL estimate mismatches)
come from different prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gpt_recipes.data.sft_demo import PREFERENCE_DIR, _built_once, ensure_preference_demo

KTO_DIR = Path("data/kto_demo")


def build_unpaired(pairs_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        pairs = [json.loads(line) for line in (pairs_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                for p in pairs for side in ("chosen", "rejected")]
        rng.shuffle(rows)
        with (out_dir / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        counts[split] = len(rows)
    return counts


def ensure_kto_demo(train_path: str) -> None:
    """The demo KTO rows (and the pairs and task they come from), built on first use."""
    if Path(train_path).resolve() == (KTO_DIR / "train.jsonl").resolve():
        ensure_preference_demo(str(PREFERENCE_DIR / "train.jsonl"))
    _built_once(KTO_DIR, train_path, lambda out: build_unpaired(PREFERENCE_DIR, out), "demo KTO rows")
