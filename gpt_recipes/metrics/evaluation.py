"""Downstream evaluation with EleutherAI's lm-evaluation-harness: of a Hugging Face folder, of a
recipe checkpoint (exported on the fly), or of the live engine between training steps.

Standard tasks fetch their data sets from the hub. One small task is defined here and built
offline from the default corpus, so evaluation works on a fresh machine: `docstring_choice`,
choosing a standard-library function's first docstring sentence among four (the others are
another function's sentence and two scrambled copies of the right one), over the modules the
fine-tuning demo holds out.
"""

from __future__ import annotations

import difflib
import functools
import json
import random
from pathlib import Path
from typing import Any

from gpt_recipes.errors import UserError

HARNESS = "lm-eval==0.4.13"
LOCAL_TASK = "docstring_choice"
LOCAL_TASK_FILE = Path("data/eval") / f"{LOCAL_TASK}.jsonl"
CHOICES = 4
NOT_SCORES = ("alias", "sample_len")  # what the harness reports beside its metrics


def harness():
    """The lm_eval package, or a one-line error saying how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator  # noqa: F401
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed: pip install '{HARNESS}' (or make install)")
    import lm_eval

    _no_bars_off_a_terminal()
    return lm_eval


def _no_bars_off_a_terminal() -> None:
    """The harness draws its request bars with an explicit `disable=` (which TQDM_DISABLE does not
    override), so into a log file they came as one long line per task: off a terminal they are off."""
    import importlib

    from tqdm import tqdm

    from gpt_recipes.console import progress_bars

    if progress_bars():
        return

    def quiet(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    for name in ("lm_eval.models.huggingface", "lm_eval.api.model", "lm_eval.api.task", "lm_eval.evaluator"):
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is tqdm:
            module.tqdm = quiet


def _scrambled(sentence: str, rng: random.Random) -> str | None:
    words = sentence.split()
    for _ in range(10):
        shuffled = rng.sample(words, len(words))
        if shuffled != words:
            return " ".join(shuffled)
    return None


def build_local_task(sft_val: Path, out_file: Path, seed: int = 0) -> int:
    """Write the local task's rows from the demo task's held-out rows; returns their count.

    The four answers to a question are the function's first docstring sentence, another
    function's, and two scrambled copies of the right one (its words in random orders). So
    the scale reads: 0.25 by chance, about 0.5 for a model that tells fluent text from
    scrambled but not which sentence belongs to the function, above that for one that does.
    Other functions' sentences alone were tried first: the 5M-parameter demo models, quickstart
    and fine-tuned, scored 0.252 and 0.248 there, as a random model (0.252)."""
    rows = [json.loads(line) for line in sft_val.read_text().splitlines() if line.strip()]
    questions = [r["messages"][0]["content"] for r in rows]
    answers = [r["messages"][1]["content"] for r in rows]
    rng = random.Random(seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    tmp = out_file.with_suffix(".tmp")
    distinct = sorted(set(answers))
    with tmp.open("w") as f:
        for question, answer in zip(questions, answers):
            others = [a for a in distinct if a != answer]
            scrambled = {_scrambled(answer, rng) for _ in range(4)} - {None, answer}
            if not others or len(scrambled) < 2:
                continue  # a sentence too short to scramble two ways
            choices = [answer, rng.choice(others), *sorted(scrambled)[:2]]
            rng.shuffle(choices)
            f.write(json.dumps({"question": question, "choices": choices, "gold": choices.index(answer)}) + "\n")
            written += 1
    tmp.replace(out_file)
    return written


def ensure_local_task() -> Path:
    """The local task's data file, built on first use (with the demo task it comes from)."""
    import fcntl

    from gpt_recipes.data.sft_demo import DEFAULT_DIR, ensure_demo

    path = LOCAL_TASK_FILE.resolve()
    if not path.is_file():
        ensure_demo(str(DEFAULT_DIR / "train.jsonl"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:  # ranks take turns
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                build_local_task(DEFAULT_DIR / "val.jsonl", path)
    return path


def local_task_config() -> dict[str, Any]:
    """The harness task config of the local task (a multiple-choice task over a JSON file)."""
    return {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(ensure_local_task())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 2.0},
    }


@functools.cache
def task_manager() -> Any:
    """The harness's index of its tasks: built once per process (it reads every task's YAML, ~10 s here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(names: list[str]) -> list[Any]:
    """Task names as the harness takes them (the local task as its config); an unknown name is a
    one-line error listing the close ones."""
    harness()
    if not names:
        raise UserError("--tasks: name at least one task")
    known, manager = None, None
    out: list[Any] = []
    for name in names:
        if name == LOCAL_TASK:
            out.append(local_task_config())
            continue
        if known is None:
            manager = task_manager()
            known = set(manager.all_tasks) | {LOCAL_TASK}
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            raise UserError(f"unknown task {name!r}" + (f"; close: {', '.join(close)}" if close else
                                                         f"; the local task is {LOCAL_TASK}"))
        check_task_data(name, manager)
        out.append(name)
    return out


def _hub_reachable(timeout: float = 3.0) -> bool:
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_task_data(name: str, manager: Any) -> None:
    """A hub task's data set must be in the local cache or the hub reachable: found out in
    seconds, before a download would retry for most of a minute and end in a traceback."""
    import os
    from pathlib import Path

    entry = manager.task_index.get(name)
    path = (getattr(entry, "cfg", None) or {}).get("dataset_path")
    if not path or Path(path).exists():
        return
    cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    if any(cache.glob(f"{path.replace('/', '___')}*")):
        if not _hub_reachable():
            os.environ["HF_DATASETS_OFFLINE"] = "1"  # read it from the cache, without asking the hub
        return
    if not _hub_reachable():
        raise UserError(f"task {name} needs its data set {path} from the Hugging Face hub, which this machine cannot "
                        "reach; run it once where there is a network (the data set is then cached in "
                        f"{cache}), or use the local task {LOCAL_TASK}")


def language_model(model, tokenizer, batch_size: int):
    """The harness's Hugging Face model around an already built model (or the engine's module,
    whose ZeRO-3 hooks gather each layer as the forward pass reaches it)."""
    harness()
    import logging

    from lm_eval.models.huggingface import HFLM

    # It warns, on every rank and every call, that a built model means a single-process call:
    # here each rank runs every request itself, on purpose.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))


def evaluate(lm, tasks: list[Any], limit: int | None, chat: bool) -> dict[str, Any] | None:
    """Run the harness; its results dictionary (JSON-serialisable parts). The harness returns them
    on local rank 0 only: None elsewhere."""
    harness()
    from lm_eval import evaluator

    from gpt_recipes.console import heartbeat

    with heartbeat("lm-evaluation-harness", show=getattr(lm, "rank", 0) == 0):
        results = evaluator.simple_evaluate(model=lm, tasks=tasks, limit=limit, apply_chat_template=chat,
                                            log_samples=False, random_seed=0, numpy_random_seed=0,
                                            torch_random_seed=0, fewshot_random_seed=0, verbosity="ERROR")
    if results is None:
        return None
    return {key: results[key] for key in ("results", "versions", "n-shot", "config") if key in results}


def _metrics(results: dict[str, Any]):
    """(task, metric, value, standard error or None) for every metric the harness reports."""
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, variant = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric not in NOT_SCORES:
                err = metrics.get(f"{metric}_stderr,{variant}" if variant else f"{metric}_stderr")
                yield task, metric, float(value), err if isinstance(err, (int, float)) else None


def scores(results: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} for every metric the harness reports (standard errors left out)."""
    return {f"{task}/{metric}": value for task, metric, value, _ in _metrics(results)}


def table(results: dict[str, Any]) -> str:
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metric, value, err in _metrics(results):
        lines.append(f"| {task} | {metric} | {value:.4f} | {'-' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines)
