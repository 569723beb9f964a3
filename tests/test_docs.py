"""Every command README.md, docs/ and the Makefile show must parse: the script exists, knows each
flag, and a command without placeholders parses whole (types, choices, positionals). So the
docs cannot drift from the code."""

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tests.helpers import REPO, parser_of

SCRIPT = r"(?:recipes|tools|benchmarks)/[a-z_]+\.py"
LAUNCHER = r"(?:python3?|deepspeed|torchrun|accelerate launch|\$\(PYTHON\)|\$\(LAUNCH\))"
# In a fenced block: any launch of a script. In running text: a launch, or a script with a flag.
FENCED = re.compile(rf"{LAUNCHER}\b[^\n]*?\s({SCRIPT})([^\n]*)")
INLINE = re.compile(rf"^(?:({LAUNCHER})\b[^\n]*?\s({SCRIPT})(.*)|()({SCRIPT})(\s+--.*|\s*))$")
# Wrapped around the command or standing for something the reader supplies.
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(\.json)?|[a-z]+_OR_[A-Z_]+)$")


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tests" / "README.md", REPO / "Makefile"]


def documented_commands() -> list[tuple[str, str, str, bool]]:
    """(where, script, the text after it, launched) for every command shown; a script named in
    running text with some of its flags, not launched, is a fragment: its flags are checked."""
    found = []
    for doc in _documents():
        text = doc.read_text()
        if doc.name == "Makefile":
            blocks, spans = [text], []
        else:
            blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for block in blocks:
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                found += [(doc.name, m.group(1), m.group(2), True) for m in FENCED.finditer(line)]
        for span in spans:
            if m := INLINE.match(span.strip()):
                launched = m.group(1) is not None
                found.append((doc.name, *(m.group(2, 3) if launched else m.group(5, 6)), launched))
    return found


def _words(rest: str) -> list[str]:
    rest = rest.split(" # ")[0].split("  #")[0].split(" ──>")[0]
    rest = re.sub(r"\s+\|\s+(?=[a-z])", " ", rest)  # "[--x a | b]": alternatives
    return shlex.split(rest.replace("[", " ").replace("]", " "))


def check(parser: argparse.ArgumentParser, rest: str, whole: bool) -> str | None:
    """Why `rest` does not parse, or None."""
    words = _words(rest)
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = [w.split("=")[0] for w in words if w.startswith("--") and w != "--" and w.split("=")[0] not in known]
    if unknown:
        return f"unknown flags {unknown}"
    if not whole or "[" in rest or any(PLACEHOLDER.match(w) for w in words):
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(words)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    scripts = {script for _, script, _, _ in COMMANDS}
    assert {"recipes/pretrain.py", "recipes/finetune.py", "recipes/dpo.py", "tools/prepare_data.py",
            "tools/convert_to_hf.py", "tools/evaluate.py", "tools/plan_memory.py",
            "benchmarks/benchmark.py"} <= scripts
    assert len(COMMANDS) > 60 and sum(launched for *_, launched in COMMANDS) > 40


@pytest.mark.parametrize("script", sorted({script for _, script, _, _ in COMMANDS}))
def test_every_documented_command_parses(script):
    assert (REPO / script).is_file(), f"{script} is shown in the docs but does not exist"
    parser = parser_of(script)
    problems = []
    for where, shown, rest, launched in COMMANDS:
        if shown != script:
            continue
        own, _, passed_on = rest.partition(" -- ")
        why = check(parser, own, whole=launched)
        if why is None and passed_on:  # the sweep hands flags after `--` to the pretraining recipe
            why = check(parser_of("recipes/pretrain.py"), passed_on, whole=launched)
        if why:
            problems.append(f"{where}: {script}{rest}\n    {why}")
    assert not problems, "\n".join(problems)


def test_a_drifted_command_is_caught():
    parser = parser_of("tools/convert_to_hf.py")
    assert check(parser, " runs/a exported/a --tag step3", whole=True) is None
    assert "unknown flags ['--verify_logits']" in check(parser, " runs/a out --verify_logits", whole=True)
    assert "invalid choice" in check(parser, " runs/a out --dtype fp8", whole=True)
    assert check(parser, " RUN OUT [--dtype fp32|bf16]", whole=True) is None  # placeholders: flags only
    assert "required" in check(parser_of("tools/summarize_throughput.py"), " --markdown", whole=True)


def test_every_test_the_docs_cite_exists():
    """`test_x.py` and `test_x.py::test_y` in the docs name a test file and a test in it."""
    files = {p.name: p.read_text() for p in (REPO / "tests").rglob("test_*.py")}
    missing = []
    for doc in _documents():
        for m in re.finditer(r"\b(test_[a-z_]+\.py)(?:::(test_[a-z0-9_]+))?", doc.read_text()):
            name, test = m.groups()
            if name not in files or (test and not re.search(rf"^def {test}\b", files[name], flags=re.M)):
                missing.append(f"{doc.name}: {m.group(0)}")
    assert not missing, "\n".join(missing)


LAUNCH_LINE = re.compile(rf"(deepspeed|torchrun|\$\(LAUNCH\)|python3?)\b([^\n]*?)\s(recipes/[a-z_]+\.py)([^\n]*)")


def recipe_launches(with_launcher: bool = False) -> list[tuple]:
    """(where, recipe, its flags, ranks[, launcher]) for every recipe launch the docs show in full."""
    found = []
    for doc in _documents():
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text):
            for m in LAUNCH_LINE.finditer(block):
                launcher, flags, script, rest = m.groups()
                ranks = re.search(r"--(?:num_gpus|nproc_per_node|num_processes)[ =](\d+)", flags)
                ranks = int(ranks.group(1)) if ranks else 2 if launcher == "$(LAUNCH)" else 1
                found.append((doc.name, script, rest, ranks, *([launcher] if with_launcher else [])))
    return found


# Inputs a command needs that earlier documented commands make (an export, a fine-tuned model,
# the user's own text): such a command is parsed above but not started here.
BUILT_ON_FIRST_USE = ("data/stdlib", "data/sft_demo/", "data/dpo_demo/", "data/kto_demo/", "data/grpo_demo/")


def _missing_inputs(words: list[str], root: Path) -> list[str]:
    missing, flag = [], None
    for value in words:
        if value.startswith("--"):
            flag = value
            continue
        if flag == "--reward_funcs" and ".py:" in value:  # a list: every value after the flag
            value = value.split(":")[0]
        elif not (flag in ("--data", "--model_name_or_path", "--deepspeed_config", "--val_data") or
                  flag == "--model" and ("/" in value or value.endswith(".json"))):
            continue
        if not (root / value).exists() and not value.startswith(BUILT_ON_FIRST_USE):
            missing.append(value)
    return missing


@pytest.mark.slow
def test_the_documented_recipe_commands_start(tmp_path, monkeypatch, capsys):
    """Each recipe command the docs show in full, whose inputs a fresh clone has (the default corpus
    is prepared on first use), runs every check it makes before starting its ranks, with the
    number of ranks its launcher gives. The ranks themselves are not started."""
    import runpy
    import sys

    import gpt_recipes.runner as runner

    class _Started(Exception):
        pass

    def started(*args, **kwargs):
        raise _Started

    for name in ("data", "ds_configs"):  # the commands' relative paths, in a folder of their own
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "execute", started)
    monkeypatch.setattr(runner, "RunLock", lambda out_dir: None)
    problems, ran = [], 0
    for where, script, rest, ranks in recipe_launches():
        words = _words(rest)
        if any(w.startswith(BUILT_ON_FIRST_USE[1:]) for w in words):
            continue  # the demos' rows are built by the walk below, not by a parse
        if "..." in rest or any(PLACEHOLDER.match(w) for w in words) or _missing_inputs(words, tmp_path):
            continue
        monkeypatch.setattr(sys, "argv", [script, *words])
        for key, value in {"WORLD_SIZE": ranks, "LOCAL_WORLD_SIZE": ranks, "RANK": 0}.items():
            monkeypatch.setenv(key, str(value))
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except _Started:
            ran += 1
        except SystemExit as stop:
            problems.append(f"{where}: {script}{rest}\n    exit {stop.code}: {capsys.readouterr().err.strip()[-300:]}")
        capsys.readouterr()
    assert not problems, "\n".join(problems)
    assert ran >= 7, ran  # as many as the docs held, whole and runnable, when this was written



def _walk_command(launcher: str, ranks: int, script: str, words: list[str], port: int) -> list[str]:
    """The command as the docs show it (launcher, ranks, script, flags), through its first
    optimizer step: a run longer than the README's 4-step long-context row trains 1 step."""
    import sys

    from gpt_recipes.launch import launcher_prefix

    steps = next((int(v) for f, v in zip(words, words[1:]) if f == "--max_steps"), 200)
    start = [sys.executable] if launcher.startswith("python") else launcher_prefix(
        "torchrun" if launcher == "torchrun" else "deepspeed", ranks, port)
    return [*start, script, *words, *(["--max_steps", "1"] if steps > 4 else [])]


@pytest.mark.docs_walk
def test_every_documented_recipe_command_trains(tmp_path):
    """`make test-docs`: each recipe command the docs show in full runs here, with its launcher and
    ranks, through its first optimizer step (to its end if it is 4 steps or fewer) and to its
    exports. Each runs in a folder of its own (the docs' commands are alternatives, several writing
    runs/pretrain), beside the clone's data/ and one exported/ that all share: a command that needs
    what another makes (an export) runs after it. Of alternatives shown as [A | B], A is run."""
    import subprocess
    import time

    from gpt_recipes.launch import master_port, unbuffered_env

    (REPO / "data").mkdir(exist_ok=True)  # the default corpus and demos, prepared once for the clone
    (tmp_path / "exported").mkdir()
    for name in ("data", "ds_configs"):  # what a command's inputs are looked for in
        (tmp_path / name).symlink_to(REPO / name)
    pending, seen = [], set()
    for where, script, rest, ranks, launcher in recipe_launches(with_launcher=True):
        words = _words(re.sub(r"\s+\|\s+[^\]\s]+", "", rest))
        key = (launcher, ranks, script, tuple(words))
        if "..." in rest or any(PLACEHOLDER.match(w) for w in words) or key in seen:
            continue
        seen.add(key)
        pending.append((where, key))
    problems, times = [], []
    while ready := [item for item in pending if not _missing_inputs(list(item[1][3]), tmp_path)]:
        for item in ready:
            pending.remove(item)
            where, (launcher, ranks, script, words) = item
            folder = tmp_path / f"command{len(times)}"
            folder.mkdir()
            for name in ("data", "ds_configs", "recipes"):
                (folder / name).symlink_to(REPO / name)
            (folder / "exported").symlink_to(tmp_path / "exported")
            with master_port() as port:
                cmd = _walk_command(launcher, ranks, script, list(words), port)
                start = time.monotonic()
                proc = subprocess.run(cmd, cwd=folder, env=unbuffered_env(PYTHONPATH=str(REPO)),
                                      capture_output=True, text=True, timeout=900)
            times.append(f"{time.monotonic() - start:6.1f} s  {where}: {script} {' '.join(words)}")
            if proc.returncode != 0:
                problems.append(f"{where}: {' '.join(cmd)}\n    exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
    print("\n".join(times))
    # Inputs the user brings (their text, their reward file) are parsed above; an export another
    # command makes must have been made.
    never = [f"{where}: {key[2]} (needs {needs})" for where, key in pending
             if (needs := [p for p in _missing_inputs(list(key[3]), tmp_path) if p.startswith("exported/")])]
    assert not problems, "\n".join(problems)
    assert not never, "inputs no documented command makes:\n" + "\n".join(never)
    assert len(times) >= 15, times


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[`*~]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_and_anchor_in_the_docs_resolves():
    problems = []
    for doc in _documents()[:-1]:  # the Makefile links nothing
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{doc.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", file.read_text(), flags=re.M)}
                if anchor not in anchors:
                    problems.append(f"{doc.name}: {target} (no heading with that anchor in {file.name})")
    assert not problems, "\n".join(problems)


def _package_names() -> dict[str, list[str]]:
    """{a module's or sub-package's last name: its dotted names} in gpt_recipes."""
    names: dict[str, list[str]] = {}
    for path in (REPO / "gpt_recipes").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    return names


FILE_SUFFIXES = {"json", "jsonl", "md", "py", "pt", "txt", "bin", "png", "sh", "csv", "safetensors", "lock"}
JSON_SECTIONS = {"compile", "optimizer", "scheduler", "bf16", "fp16", "zero_optimization", "timers", "tensor_parallel",
                 "pipeline", "checkpoint", "activation_checkpointing", "expert_parallel"}


def test_every_module_path_the_docs_name_exists():
    """`gpt_recipes/x/y.py` files, and `module.name` references whose module is one of the package's
    (or whose name is a private one, which only the package's code can mean), resolve."""
    import importlib
    import importlib.util

    names, problems = _package_names(), []
    for doc in _documents()[:-1]:
        text = doc.read_text()
        for path in re.findall(r"\b(gpt_recipes/[\w/]+\.py)\b", text):
            if not (REPO / path).is_file():
                problems.append(f"{doc.name}: {path} (no such file)")
        for module, attr in re.findall(r"`([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)(?:\(\))?`", text):
            first = module.split(".")[0]
            if attr in FILE_SUFFIXES or (first not in names or first in JSON_SECTIONS) and not attr.startswith("_"):
                continue  # metrics.jsonl, compile.enabled, torch.compile, engine.step: not the package's names
            candidates = [d for d in names.get(module.split(".")[-1], []) if d.endswith(module)]
            found = any(hasattr(importlib.import_module(d), attr) or importlib.util.find_spec(f"{d}.{attr}")
                        for d in candidates)
            if not found:
                problems.append(f"{doc.name}: `{module}.{attr}` (no such module or name in gpt_recipes)")
    assert not problems, "\n".join(problems)


def test_every_shipped_json_is_in_the_configs_table():
    table = (REPO / "docs" / "deepspeed_and_launchers.md").read_text().split("### DeepSpeed configs", 1)[1]
    table = table.split("\n\n", 2)[1]
    missing = [p.name for p in (REPO / "ds_configs").glob("*.json") if f"`ds_configs/{p.name}`" not in table]
    assert not missing, missing
