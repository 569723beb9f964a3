"""A built-in fine-tuning task made offline from real text: name a standard-library function's purpose.

Each example asks, for a documented function or method of the Python standard library, what
it does, given its signature; the answer is the first sentence of its docstring, as its
author wrote it. Functions are split into train and validation by module, so validation
asks about modules the fine-tune never saw.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

from gpt_recipes.data.sources import default_corpus_files


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = " ".join(first.split())
    if not (20 <= len(first) <= 160) or first.startswith(("(", ">>>", "..")):
        return None
    return first


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str | None) -> str:
    args = ast.unparse(node.args)
    name = f"{owner}.{node.name}" if owner else node.name
    return f"{name}({args})"


def examples_from_module(path: Path, module: str) -> list[dict]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []

    def visit(body, owner=None):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, node.name)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                summary = _summary(doc) if doc else None
                if summary:
                    out.append({"module": module, "signature": _signature(node, owner), "summary": summary})

    visit(tree.body)
    return out


def build(out_dir: Path, val_rows: int = 300, seed: int = 0) -> dict[str, int]:
    """Write train.jsonl and val.jsonl (chat 'messages' rows) to `out_dir`; returns row counts."""
    by_module: dict[str, list[dict]] = {}
    for path in default_corpus_files():
        module = path.stem if path.stem != "__init__" else path.parent.name
        found = examples_from_module(path, module)
        if found:
            by_module.setdefault(module, []).extend(found)
    modules = sorted(by_module)
    rng = random.Random(seed)
    held_out: set[str] = set()
    for module in rng.sample(modules, len(modules)):  # whole modules, until enough rows
        if sum(len(by_module[m]) for m in held_out) >= val_rows:
            break
        held_out.add(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, chosen in (("train", [m for m in modules if m not in held_out]), ("val", sorted(held_out))):
        rows = [r for m in chosen for r in by_module[m]]
        rng.shuffle(rows)
        with (out_dir / f"{split}.jsonl").open("w") as f:
            for r in rows:
                messages = [
                    {"role": "user", "content": f"In Python's {r['module']} module, what does {r['signature']} do?"},
                    {"role": "assistant", "content": r["summary"]},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
        counts[split] = len(rows)
    return counts


def build_preferences(sft_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Preference pairs from the demo task's rows: the function's own first docstring sentence is
    chosen, the same words in a shuffled order rejected (sentences of three words or more). The
    splits keep the task's: validation pairs come from modules training never sees.

    Another function's sentence as the rejected answer was tried first: the demo's 5M-parameter
    model, fine-tuned to a held-out loss of 5.4, could not tell which of two fluent docstrings
    belongs to a function it has not seen (held-out reward accuracy 0.56 after 150 steps), so
    the preference it is taught is one it can generalise: well-formed answers over scrambled ones."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (sft_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        questions = [r["messages"][0]["content"] for r in rows]
        answers = [r["messages"][1]["content"] for r in rows]
        pairs = []
        for question, answer in zip(questions, answers):
            words = answer.split()
            shuffled = rng.sample(words, len(words))
            if len(words) >= 3 and shuffled != words:
                pairs.append({"prompt": question, "chosen": answer, "rejected": " ".join(shuffled)})
        with (out_dir / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in pairs)
        counts[split] = len(pairs)
    return counts


def build_prompts(sft_dir: Path, out_dir: Path) -> dict[str, int]:
    """GRPO prompts from the demo task's rows: the question, with the function's signature and its
    docstring sentence as columns the reward functions receive (gpt_recipes/data/grpo_rewards.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (sft_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        with (out_dir / f"{split}.jsonl").open("w") as f:
            for row in rows:
                question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
                signature = question.split(" what does ", 1)[1].rsplit(" do?", 1)[0]
                f.write(json.dumps({"prompt": question, "signature": signature, "reference": answer}) + "\n")
        counts[split] = len(rows)
    return counts


DEFAULT_DIR = Path("data/sft_demo")
PREFERENCE_DIR = Path("data/dpo_demo")
PROMPT_DIR = Path("data/grpo_demo")


def _built_once(default_dir: Path, train_path: str, build_fn, what: str) -> None:
    """Build a demo folder on first use when its default path is asked for (ranks take turns)."""
    path = Path(train_path)
    if path.is_file() or path.resolve() != (default_dir / "train.jsonl").resolve():
        return
    import fcntl

    default_dir.mkdir(parents=True, exist_ok=True)
    with open(default_dir.parent / f".{default_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            counts = build_fn(default_dir)
            print(f"Built the {what} in {default_dir}: {counts['train']} train, {counts['val']} val rows")


def ensure_demo(train_path: str) -> None:
    """The demo fine-tuning task, built on first use."""
    _built_once(DEFAULT_DIR, train_path, build, "demo fine-tuning task")


def ensure_preference_demo(train_path: str) -> None:
    """The demo preference pairs (and the task they come from), built on first use."""
    if Path(train_path).resolve() == (PREFERENCE_DIR / "train.jsonl").resolve():
        ensure_demo(str(DEFAULT_DIR / "train.jsonl"))
    _built_once(PREFERENCE_DIR, train_path, lambda out: build_preferences(DEFAULT_DIR, out), "demo preference pairs")


def ensure_prompt_demo(train_path: str) -> None:
    """The demo GRPO prompts (and the task they come from), built on first use."""
    if Path(train_path).resolve() == (PROMPT_DIR / "train.jsonl").resolve():
        ensure_demo(str(DEFAULT_DIR / "train.jsonl"))
    _built_once(PROMPT_DIR, train_path, lambda out: build_prompts(DEFAULT_DIR, out), "demo GRPO prompts")
