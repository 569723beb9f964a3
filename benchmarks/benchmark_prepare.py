#!/usr/bin/env python
"""Measure tools/prepare_data.py: peak memory against corpus size, and speed against the tokenizer.

    python benchmarks/benchmark_prepare.py                         # the default corpus at 1x, 4x, 16x
    python benchmarks/benchmark_prepare.py --scales 1 4 --num_procs 1 2

The corpus is the default one (the standard library's source) repeated k times through
links, prepared with the default data folder's tokenizer. For each scale and process count
it runs prepare_data.py as a subprocess, sampling the memory of its whole process tree,
and reports tokens/s (start to end, imports and reading included, and of the tokenising
phase alone, as prepare_data.py logs it), peak memory as PSS
(each page shared by N processes counts 1/N, so worker processes are not counted twice)
and peak resident memory of the main process, and the disk used (the output plus the
`datasets` cache it builds). The reference is the tokenizer's
own batch encode (the Rust `encode_batch_fast`) over the same texts, in as many processes,
with nothing else: the practical limit of preparation.
"""

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from gpt_recipes.args import flag, parse_args
from gpt_recipes.data.prepare import DEFAULT_DATA_DIR
from gpt_recipes.data.sources import default_corpus_files
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import UserError, cli_entry

REPO = Path(__file__).resolve().parent.parent


@dataclass
class BenchmarkPrepareArgs:
    scales: list[int] = flag([1, 4, 16], "corpus sizes, as multiples of the default corpus")
    num_procs: list[int] = flag([1, 2], "tokenising processes to measure")
    tokenizer: str = flag(f"{DEFAULT_DATA_DIR}/tokenizer", "tokenizer folder (default: the default data's)")
    workdir: str = flag("", "folder for the corpora, outputs and caches (default: a temporary one, removed after)")


def _corpus(root: Path, scale: int) -> Path:
    files = default_corpus_files()
    folder = root / f"corpus_x{scale}"
    for k in range(scale):
        for i, path in enumerate(files):
            link = folder / f"copy{k}" / f"{i:05d}_{path.name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return folder


def _peak_memory(proc: subprocess.Popen) -> dict:
    """Peak PSS of a process tree and peak resident memory of its root (MiB), sampled every 50 ms."""
    peak = {"pss": 0, "rss": 0}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            pss = sum(p.memory_full_info().pss for p in tree)
            peak = {"pss": max(peak["pss"], pss), "rss": max(peak["rss"], root.memory_info().rss)}
        except psutil.Error:
            pass
        time.sleep(0.05)
    return {k: v / 2**20 for k, v in peak.items()}


def _disk_mib(*folders: Path) -> float:
    return sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*") if p.is_file()) / 2**20


def _prepare(corpus: Path, out: Path, cache: Path, tokenizer: str, num_proc: int) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tools/prepare_data.py"), str(corpus), "--output", str(out), "--tokenizer",
           tokenizer, "--file_pattern", "*.py", "--num_proc", str(num_proc)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name=name: output.update({name: getattr(proc, name).read()}))
               for name in ("stdout", "stderr")]
    for reader in readers:
        reader.start()
    memory = _peak_memory(proc)
    seconds = time.perf_counter() - start
    for reader in readers:
        reader.join()
    if proc.returncode:
        raise UserError(f"prepare_data.py failed: {output['stderr'][-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    phase = re.search(r"Tokenized part .*\(([\d,]+) tokens/s\)", output["stdout"])
    return {"tokens": tokens, "seconds": seconds, "phase": float(phase.group(1).replace(",", "")), **memory,
            "disk": _disk_mib(out, cache)}


_TOKENIZER = None


def _encode_count(texts: list[str]) -> int:
    return sum(len(e.ids) + 1 for e in _TOKENIZER.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False))


def _reference(tokenizer: str, texts: list[str], num_proc: int) -> float:
    """Tokens/s of the tokenizer's batch encode alone over `texts`, in `num_proc` processes."""
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer)
    batches = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    if num_proc == 1:
        start = time.perf_counter()
        tokens = sum(map(_encode_count, batches))
        return tokens / (time.perf_counter() - start)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        start = time.perf_counter()
        tokens = sum(pool.imap(_encode_count, batches))
        return tokens / (time.perf_counter() - start)


@cli_entry
def main() -> None:
    args = parse_args(BenchmarkPrepareArgs, description=__doc__)
    if not Path(args.tokenizer, "tokenizer_config.json").is_file():
        raise UserError(f"no tokenizer in {args.tokenizer}; prepare the default data first "
                        "(python tools/prepare_data.py) or pass --tokenizer")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    rows = []
    try:
        for scale in args.scales:
            corpus = _corpus(root, scale)
            for num_proc in args.num_procs:
                out, cache = root / f"out_x{scale}_p{num_proc}", root / f"cache_x{scale}_p{num_proc}"
                result = _prepare(corpus, out, cache, args.tokenizer, num_proc)
                rows.append({"scale": scale, "num_proc": num_proc, **result})
                shutil.rmtree(out), shutil.rmtree(cache, ignore_errors=True)
                print(f"x{scale} p{num_proc}: {result['tokens']:,} tokens in {result['seconds']:.1f} s, "
                      f"peak {result['pss']:.0f} MiB (PSS, all processes)", flush=True)
        texts = [p.read_text() for p in default_corpus_files()]
        texts = [t for t in texts if t]
        reference = {n: _reference(args.tokenizer, texts * 4, n) for n in args.num_procs}
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| corpus | processes | tokens | time (s) | tokens/s | vs batch encode | tokenising phase, tokens/s "
          "| vs batch encode | peak memory, PSS (MiB) | peak resident, main (MiB) | disk (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = r["tokens"] / r["seconds"]
        print(f"| {r['scale']}x | {r['num_proc']} | {r['tokens']:,} | {r['seconds']:.1f} | {speed:,.0f} | "
              f"{speed / reference[r['num_proc']]:.0%} | {r['phase']:,.0f} | {r['phase'] / reference[r['num_proc']]:.0%} | "
              f"{r['pss']:.0f} | {r['rss']:.0f} | {r['disk']:.0f} |")
    print("\nBatch encode alone (4x corpus in memory): " + ", ".join(
        f"{n} process{'es' if n > 1 else ''}: {v:,.0f} tokens/s" for n, v in reference.items()))


if __name__ == "__main__":
    main()
