"""The run's output folder: refuse to clobber it, and record the resolved configuration."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_DIR, latest_tag
from .errors import UserError

RUN_CONFIG_FILE = "config.json"


def check_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Check that the run may write to `out_dir`; returns whether there is a checkpoint to resume."""
    has_checkpoint = latest_tag(out_dir / CHECKPOINT_DIR) is not None
    if resume:
        return has_checkpoint
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"--output_dir {out_dir} is not empty; pass --resume to continue it, --overwrite to start "
            "a fresh run there, or choose another folder"
        )
    return False


def write_run_config(out_dir: Path, record: dict[str, Any]) -> None:
    import deepspeed
    import torch
    import transformers

    record = {
        **record,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / RUN_CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
