"""The CPU's description that DeepSpeed's op builders ask for, kept between launches.

Each time DeepSpeed loads one of its CPU ops (the shared-memory collectives, the CPU Adam or
fused Adam), its builder asks py-cpuinfo twice for the CPU's architecture and flags (to pick
-march and the SIMD width), and py-cpuinfo answers by starting a Python subprocess: about
1.1 s a question on this 2-core machine, 4.4 s of every 2-rank launch before training starts.
The answer is a property of the machine, so it is kept in the process and in a small file
keyed by the host name and the contents of /proc/cpuinfo (without its clock readings): a
file copied to another machine, or a machine with another CPU, never matches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt_recipes"


def machine_key() -> str | None:
    """The host name and /proc/cpuinfo (clock readings left out), hashed; None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    stable = "\n".join(line for line in text.splitlines() if not re.match(r"(cpu MHz|bogomips)\s*:", line, re.I))
    return hashlib.sha256(f"{socket.gethostname()}\n{stable}".encode()).hexdigest()[:16]


def cached(answer: Callable[[], dict[str, Any]], key: str | None, folder: Path = CACHE_DIR) -> Callable[[], dict]:
    """`answer`, asked once per machine: from the file for `key` when there is one, else asked and kept."""

    @functools.lru_cache(maxsize=1)
    def get_cpu_info() -> dict[str, Any]:
        path = folder / f"cpuinfo-{key}.json" if key else None
        if path is not None and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        info = answer()
        if path is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(info))
                tmp.replace(path)
            except OSError:  # a read-only home: asked again next time, nothing more
                pass
        return info

    get_cpu_info.kept = True
    return get_cpu_info


def keep_cpu_info() -> None:
    """Make py-cpuinfo's get_cpu_info (as DeepSpeed's op builders import it) ask once per machine."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu instead
        return
    if not getattr(cpuinfo.get_cpu_info, "kept", False):
        cpuinfo.get_cpu_info = cached(cpuinfo.get_cpu_info, machine_key())
