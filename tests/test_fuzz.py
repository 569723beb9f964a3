"""Property-based tests (hypothesis): mutate valid inputs and run them through the checks a launch
runs, in this process. The only outcomes allowed are success or a UserError of one line (a
script: exit 0, or exit 2 with one `error:` line); never another exception.

    pytest tests/test_fuzz.py                                   # the bounded CI run (derandomized)
    HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz.py        # many more examples, new ones each time

Inputs mutated: DeepSpeed JSONs (keys dropped, duplicated or retyped, strings for numbers and
booleans, sections replaced by scalars), the flags of the recipes and tools (non-finite and
out-of-range numbers; paths that are missing, files, folders, not UTF-8, uncreatable),
a prepared folder's meta.json, fine-tuning rows, `--ds` overrides (keys DeepSpeed reads and keys
it reads nowhere, odd values), pipeline sections (stages, partitions against each family's
layers, checkpoint intervals), reward functions (raising, exiting, mutating their inputs,
returning numpy numbers, None, NaN or the wrong length), GRPO prompt rows, and writers of one
export folder (started, finished, failed, killed, one while another writes).
"""

from __future__ import annotations

import copy
import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt_recipes import ds_config
from gpt_recipes.errors import UserError
from tests.helpers import REPO

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("explore", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHIPPED = {p.name: json.loads(p.read_text()) for p in sorted((REPO / "ds_configs").glob("*.json"))}
ODD_VALUES = st.one_of(
    st.booleans(), st.none(), st.integers(-3, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["auto", "true", "false", "1e-3", "8", "none", "cpu", "nvme", "", "AdamW", "gpu"]),
    st.text(max_size=6), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                    max_size=2))


def one_line(err: BaseException) -> bool:
    return "\n" not in str(err).strip()


def failure(err: BaseException) -> str:
    """A name for where an unexpected exception came from: its type and the innermost frame of
    the project's own code (or of the library that raised it)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/gpt_recipes/" in f.filename or "/recipes/" in f.filename or "/tools/" in f.filename]
    where = (ours or frames or [None])[-1]
    site = f"{Path(where.filename).name}:{where.lineno}" if where else "?"
    return f"{type(err).__name__} at {site}: {str(err).splitlines()[0][:80] if str(err) else ''}"


def outcome_of(call) -> str | None:
    """None when `call` succeeds or raises a one-line UserError; else what went wrong."""
    try:
        call()
    except UserError as err:
        return None if one_line(err) else f"UserError of {len(str(err).splitlines())} lines: {str(err)[:80]}"
    except Exception as err:
        return failure(err)
    return None


class Pairs(list):
    """A JSON object written with its keys as listed, duplicates included."""


def dump(node) -> str:
    if isinstance(node, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in node) + "}"
    if isinstance(node, dict):
        return dump(Pairs(node.items()))
    if isinstance(node, list):
        return "[" + ", ".join(dump(v) for v in node) + "]"
    return json.dumps(node)


def key_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from key_paths(value, (*prefix, key))


@st.composite
def mutated_configs(draw) -> str:
    """The text of a shipped DeepSpeed JSON after one to three mutations."""
    cfg = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(key_paths(cfg))))
        parent = cfg
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["drop", "retype", "retype", "duplicate", "add"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "retype":
            parent[path[-1]] = draw(ODD_VALUES)
        elif action == "add":
            parent[draw(st.sampled_from(["stage", "enabled", "lr", "device", "nvme_path", "compile", "timers",
                                         "offload_param", "betas", "type", "params"]))] = draw(ODD_VALUES)
        else:
            duplicate = path
        if not cfg:
            break
    text = dump(cfg)
    if duplicate is not None:  # the key once more, with another value, in the same object
        key = json.dumps(duplicate[-1]) + ": "
        at = text.find(key)
        if at >= 0:
            text = text[:at] + key + dump(draw(ODD_VALUES)) + ", " + text[at:]
    return text


def config_outcome(text: str, world_size: int) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.json"
        path.write_text(text)

        def resolve():
            cfg, plan, _ = ds_config.resolve(path, world_size, 10, "cpu", Path(tmp) / "monitor")
            assert plan.global_batch >= 1 and ds_config.precision(cfg) in ("bf16", "fp32", "fp16")
            assert ds_config.zero_stage(cfg) in (0, 1, 2, 3)

        return outcome_of(resolve)


@given(text=mutated_configs(), world_size=st.sampled_from([1, 2, 3, 8]))
def test_any_deepspeed_json_is_run_or_refused_in_one_line(text, world_size):
    assert config_outcome(text, world_size) is None


@given(change=st.dictionaries(st.sampled_from(["format", "dtype", "vocab_size", "splits", "tokenizer",
                                               "eos_token_id", "num_shards", "preparation"]), ODD_VALUES,
                              min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(["dtype", "splits", "vocab_size", "tokenizer"]), max_size=2))
def test_any_meta_json_is_read_or_refused_in_one_line(tiny_data, change, drop):
    assert meta_outcome(tiny_data, change, drop) is None


def meta_outcome(tiny_data: Path, change: dict, drop: list) -> str | None:
    from gpt_recipes.data.tokens import read_meta

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        shutil.copytree(tiny_data, folder)
        meta = json.loads((folder / "meta.json").read_text())
        meta.update(change)
        for key in drop:
            meta.pop(key, None)
        (folder / "meta.json").write_text(json.dumps(meta))
        return outcome_of(lambda: read_meta(folder))


MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                          st.one_of(st.sampled_from(["user", "assistant", "system", "bot", ""]), ODD_VALUES),
                          max_size=3)
ROWS = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=4), ODD_VALUES)}),
    st.dictionaries(st.sampled_from(["prompt", "response", "messages", "chosen", "rejected", "text"]),
                    st.one_of(st.text(max_size=20), ODD_VALUES), max_size=4),
)


def row_outcome(tokenizer, row: dict) -> str | None:
    from gpt_recipes.data import sft

    where = "rows.jsonl row 1"
    found = outcome_of(lambda: sft.encode(tokenizer, sft.to_messages(row, where), where))
    return found


@given(row=ROWS)
def test_any_fine_tuning_row_is_encoded_or_refused_in_one_line(fuzz_tokenizer, row):
    assert row_outcome(fuzz_tokenizer, row) is None


@pytest.fixture(scope="module")
def fuzz_tokenizer(tiny_data):
    from gpt_recipes.data import sft
    from gpt_recipes.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_data / "tokenizer")
    sft.ensure_chat_template(tokenizer)
    return tokenizer


# Flags of the recipes and tools: each script runs in this process up to where it would start
# the ranks (the recipes) or with its work done for real on tiny inputs (the tools).
class _Reached(Exception):
    """The recipe passed every check it makes before starting its ranks."""


def script_outcome(script: str, argv: list[str], monkeypatch, capsys) -> str | None:
    """Run `script` as `python script argv...` in this process: None if it ends in success or with
    status 2 and one `error:` line, else what went wrong."""
    import gpt_recipes.runner as runner

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(runner, "execute", reached)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.chdir(tempfile.mkdtemp())  # relative paths among the flags land in a scratch folder
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    except (_Reached, SystemExit) as stop:
        code = 0 if isinstance(stop, _Reached) else stop.code if isinstance(stop.code, int) else 1
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        if code == 2 and (len(errors) != 1 or "Traceback" in err):
            return f"{script}: {len(errors)} error lines: {err.strip().splitlines()[-1][:100]}"
        return None if code in (0, 2) else f"{script}: exit {code}"
    except Exception as err:
        capsys.readouterr()
        return f"{script}: {failure(err)}"
    return None


class Paths:
    """Hostile paths in a scratch folder: missing, a file, a folder, text that is not UTF-8,
    a file where a folder is asked for, a path that cannot be created."""

    def __init__(self, root: Path):
        self.root = root
        (root / "a_file.txt").write_text("plain text\n")
        (root / "a_folder").mkdir()
        (root / "not_utf8.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
        (root / "empty.json").write_text("")

    def strategy(self):
        r = self.root
        return st.sampled_from([str(r / "missing"), str(r / "a_file.txt"), str(r / "a_folder"), str(r / "not_utf8.jsonl"),
                                str(r / "a_file.txt" / "below"), "/proc/x/y", str(r / "empty.json"), str(r)])


NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e12", "99999999999", "abc", "0.5", "3"])


@st.composite
def hostile_flags(draw, actions: list, paths: Paths):
    """One to three of a script's flags, each with a hostile value of its kind."""
    chosen = draw(st.lists(st.sampled_from(actions), min_size=1, max_size=3, unique_by=lambda a: a.dest))
    argv = []
    for action in chosen:
        flag = action.option_strings[0]
        if action.nargs == 0:
            argv.append(flag)
        elif action.choices:
            argv.append(f"{flag}={draw(st.sampled_from([*map(str, action.choices), 'other']))}")
        else:
            argv.append(f"{flag}={draw(st.one_of(NUMBERS, paths.strategy()))}")
    return argv


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory, tiny_data, tiny_model):
    """Valid inputs for each script, and a scratch folder of hostile paths."""
    from gpt_recipes.data.tokenizer import load_tokenizer
    from gpt_recipes.models.causal_lm import build_config, build_model

    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = load_tokenizer(tiny_data / "tokenizer")
    model = root / "model"
    build_model(build_config(str(tiny_model), len(tokenizer), tokenizer.eos_token_id)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i}?", "response": f"It is {i}."}) + "\n"
                            for i in range(40)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i}?", "chosen": f"It is {i}.", "rejected": "No."}) + "\n"
                             for i in range(40)))
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"prompt": f"What is {i}?", "completion": f"It is {i}.", "label": i % 2 == 0})
                                + "\n" for i in range(40)))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i}?", "answer": str(i)}) + "\n" for i in range(40)))
    rewards = root / "rewards.py"
    rewards.write_text("def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    cfg = root / "ds.json"
    cfg.write_text(json.dumps({**SHIPPED["zero2.json"], "train_micro_batch_size_per_gpu": 2}))
    shutil.copy(REPO / "tests" / "fixtures" / "recipe_zero0_metrics.jsonl", root / "metrics.jsonl")
    corpus = root / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return {"root": root, "data": tiny_data, "model": model, "tiny_model": tiny_model, "rows": rows,
            "pairs": pairs, "labelled": labelled, "prompts": prompts,
            "rewards": rewards, "cfg": cfg, "metrics": root / "metrics.jsonl", "corpus": corpus, "paths": Paths(root)}


def baseline(script: str, inputs: dict, out: Path) -> list[str]:
    """A command line of `script` that passes its checks."""
    common = ["--deepspeed_config", str(inputs["cfg"]), "--output_dir", str(out), "--max_steps", "2"]
    return {
        "recipes/pretrain.py": ["--data", str(inputs["data"]), "--model", str(inputs["tiny_model"]), "--seq_len", "32",
                                *common],
        "recipes/finetune.py": ["--model_name_or_path", str(inputs["model"]), "--data", str(inputs["rows"]),
                                "--truncate", *common],
        "recipes/dpo.py": ["--model_name_or_path", str(inputs["model"]), "--data", str(inputs["pairs"]), "--truncate",
                           *common],
        "recipes/kto.py": ["--model_name_or_path", str(inputs["model"]), "--data", str(inputs["labelled"]),
                           "--truncate", *common],
        "recipes/grpo.py": ["--model_name_or_path", str(inputs["model"]), "--data", str(inputs["prompts"]),
                            "--reward_funcs", f"{inputs['rewards']}:length", "--num_generations", "2",
                            "--max_completion_length", "8", *common],
        "tools/generate.py": [str(inputs["model"]), "--prompt", "def", "--max_new_tokens", "2"],
        "tools/summarize_throughput.py": [str(inputs["metrics"])],
        "tools/plan_memory.py": ["--model", "gpt2-nano", "--ranks", "2"],
        "tools/prepare_data.py": [str(inputs["corpus"]), "--tokenizer", str(inputs["data"] / "tokenizer"), "--output",
                                  str(out)],
        "tools/convert_to_hf.py": [str(inputs["root"] / "missing_run"), str(out)],
    }[script]


FLAG_SCRIPTS = ["recipes/pretrain.py", "recipes/finetune.py", "recipes/dpo.py", "recipes/kto.py", "recipes/grpo.py",
                "tools/generate.py",
                "tools/summarize_throughput.py", "tools/plan_memory.py", "tools/prepare_data.py",
                "tools/convert_to_hf.py"]


@pytest.mark.parametrize("script", FLAG_SCRIPTS)
def test_any_flags_of_a_script_run_or_are_refused_in_one_line(script, fuzz_inputs, monkeypatch, capsys):
    from tests.helpers import parser_of

    actions = [a for a in parser_of(script)._actions if a.option_strings and a.dest not in ("help", "local_rank")]

    @settings(max_examples=12 if script.startswith("recipes/") else 10)
    @given(flags=hostile_flags(actions, fuzz_inputs["paths"]))
    def check(flags):
        out = Path(tempfile.mkdtemp(dir=fuzz_inputs["root"])) / "out"
        assert script_outcome(script, [*baseline(script, fuzz_inputs, out), *flags], monkeypatch, capsys) is None

    check()


# --- --ds overrides ------------------------------------------------------------------------------
# Keys DeepSpeed reads nowhere: each built from a real section and a made-up or misplaced key.
# Accepting any of them would train as if it were absent.
NOWHERE = ["lr", "foo.bar", "optimizer.lr", "optimizer.learning_rate", "optimizer.params.learning_rate",
           "pipeline.stage", "pipeline.partition_method", "scheduler.warmup_num_steps", "zero_optimization.stages",
           "bf16.enable", "zero_optimization.offload_optimizer.devices", "gradient_clip", "train_batch",
           "tensorboard.output", "wandb.projects", "expert_parallel.size", "compile.enabled",
           "scheduler.params.warmup_step", "checkpoint.tag_validations"]
OVERRIDE_VALUES = st.sampled_from(["1", "2", "0", "-1", "0.5", "1e-3", "1e999", "true", "false", "null", "\"auto\"",
                                   "auto", "[1, 2]", "{\"a\": 1}", "{}", "nan", "abc", "", "cpu", "\"none\"", "AdamW"])


@st.composite
def overridden_configs(draw) -> tuple[str, list[str], list[str]]:
    """(a shipped JSON's name, one to three --ds overrides, the keys among them DeepSpeed reads nowhere)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    held = [".".join(p) for p in key_paths(SHIPPED[name])]
    overrides, bogus = [], []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            key = draw(st.sampled_from(NOWHERE))
            bogus.append(key)
        else:
            key = draw(st.sampled_from(held))
        overrides.append(f"{key}={draw(OVERRIDE_VALUES)}")
    return name, overrides, bogus


def overrides_outcome(name: str, overrides: list[str], bogus: list[str], world_size: int) -> str | None:
    """None when the overrides resolve, or are refused in one line; a key DeepSpeed reads nowhere
    must be refused (naming a key), never trained with."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(SHIPPED[name]))
        try:
            ds_config.resolve(path, world_size, 10, "cpu", Path(tmp) / "monitor", overrides=overrides)
        except UserError as err:
            return None if one_line(err) else f"UserError of {len(str(err).splitlines())} lines: {str(err)[:80]}"
        except Exception as err:
            return failure(err)
        return f"accepted {bogus}, which DeepSpeed reads nowhere" if bogus else None


@given(case=overridden_configs(), world_size=st.sampled_from([1, 2, 4]))
def test_any_ds_override_is_read_or_refused_in_one_line(case, world_size):
    assert overrides_outcome(*case, world_size) is None


# --- Pipeline sections ----------------------------------------------------------------------------
PARTITIONS = st.one_of(st.sampled_from(["parameters", "uniform", "best", "type:Block", "type:block", "type:nosuch",
                                        "type:[", "type:", "type:.*", "type:Norm|Head", "type:Embedding",
                                        "type:RotaryBlock", "type:Block|Norm", "Block", "random"]), ODD_VALUES)


@st.composite
def pipeline_sections(draw) -> dict:
    section = dict(SHIPPED["zero1_pp2.json"]["pipeline"])
    for key, values in (("stages", st.one_of(st.integers(-1, 6), ODD_VALUES)), ("partition", PARTITIONS),
                        ("activation_checkpoint_interval", st.one_of(st.integers(-1, 3), ODD_VALUES))):
        if draw(st.booleans()):
            section[key] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        del section[draw(st.sampled_from(sorted(section)))]
    return section


def pipeline_outcome(section: dict, world_size: int, family: str) -> str | None:
    """None when the section is refused in one line before any rank starts, or when DeepSpeed's own
    partitioning of the model's layers gives every stage at least one layer it asked for."""
    from deepspeed.runtime import utils as ds_utils
    from transformers import AutoConfig

    from gpt_recipes.parallel.layout import Layout, Supports
    from gpt_recipes.parallel.pipeline import layer_classes
    from tests.helpers import TINY_GPT2, TINY_LLAMA

    spec = dict(TINY_GPT2 if family == "gpt2" else TINY_LLAMA)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pp.json"
        path.write_text(json.dumps({**SHIPPED["zero1_pp2.json"], "pipeline": section}))
        try:
            cfg, _, _ = ds_config.resolve(path, world_size, 10, "cpu", Path(tmp) / "monitor")
            layout = Layout.of_config(cfg, world_size)
            why = layout.refusal(config, 32, Supports(pipeline=True), "pretraining")
            if why is not None:
                raise UserError(why)
        except UserError as err:
            return None if one_line(err) else f"UserError of {len(str(err).splitlines())} lines: {str(err)[:80]}"
        except Exception as err:
            return failure(err)
    if not layout.partition.startswith("type:"):
        return None
    import re

    pattern = re.compile(layout.partition[5:], re.IGNORECASE)
    weights = [1 if pattern.search(name) else 0 for name in layer_classes(config)]
    parts = ds_utils.partition_balanced(weights, layout.pipeline)  # what DeepSpeed does with a type: partition
    per_stage = [sum(weights[parts[s]:parts[s + 1]]) for s in range(layout.pipeline)]
    return None if min(per_stage) >= 1 else f"accepted {layout.partition!r}, which leaves a stage {per_stage}"


@given(section=pipeline_sections(), world_size=st.sampled_from([1, 2, 4]), family=st.sampled_from(["gpt2", "llama"]))
def test_any_pipeline_section_is_run_or_refused_in_one_line(section, world_size, family):
    assert pipeline_outcome(section, world_size, family) is None


# --- Reward functions -----------------------------------------------------------------------------
BEHAVIOURS = ["number", "numpy", "none", "nan", "string", "short", "tensor", "raise", "exit0", "exit1", "interrupt",
              "mutate", "bool"]


def reward_function(behaviour: str, seen: list):
    """A reward function that does `behaviour` (and records the completions it was given)."""
    def reward(prompts, completions, **columns):
        seen.append(list(completions))
        n = len(completions)
        if behaviour == "raise":
            raise ValueError("no score for this one")
        if behaviour in ("exit0", "exit1"):
            sys.exit(int(behaviour[-1]))
        if behaviour == "interrupt":
            raise KeyboardInterrupt
        if behaviour == "mutate":
            completions[:] = ["changed"] * n
            columns.clear()
            return [1.0] * n
        return {"number": [float(i) for i in range(n)], "numpy": [np.float32(i) for i in range(n)],
                "none": [None] * n, "nan": [float("nan")] * n, "string": ["1"] * n, "short": [1.0] * (n - 1),
                "tensor": torch.ones(n), "bool": [True] * n}[behaviour]
    return reward


def reward_outcome(behaviours: list[str], completions: list[str]) -> str | None:
    """None when scoring gives a (completions, functions) table of finite numbers and NaN (for None),
    each function having seen the completions as generated, or stops in one line naming the function."""
    from gpt_recipes.train.grpo import RewardFunc, score

    seen: list = []
    funcs = [RewardFunc(f"r{k}_{b}", reward_function(b, seen), 1.0) for k, b in enumerate(behaviours)]
    try:
        table = score(funcs, ["p"] * len(completions), list(completions), {"answer": ["a"] * len(completions)})
    except UserError as err:
        if not one_line(err):
            return f"UserError of {len(str(err).splitlines())} lines"
        return None if any(f.name in str(err) for f in funcs) else f"refusal names no function: {err}"
    except BaseException as err:  # an exit or interrupt from a reward must not escape as itself
        return failure(err)
    if tuple(table.shape) != (len(completions), len(funcs)) or torch.isinf(table).any():
        return f"table {tuple(table.shape)}: {table.tolist()}"
    if any(s != list(completions) for s in seen):
        return f"a function saw completions another changed: {seen}"
    return None


@given(behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=3),
       completions=st.lists(st.text(max_size=8), min_size=1, max_size=4))
def test_any_reward_function_behaviour_scores_or_stops_in_one_line(behaviours, completions):
    assert reward_outcome(behaviours, completions) is None


@given(rows=st.lists(st.one_of(st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=12), ODD_VALUES)}), ROWS,
                               st.dictionaries(st.sampled_from(["prompt", "completions", "prompts", "answer",
                                                                "completion_ids"]), st.text(max_size=6),
                                               min_size=1, max_size=3)),
                     min_size=1, max_size=3))
def test_any_prompt_row_is_read_or_refused_in_one_line(fuzz_tokenizer, rows):
    assert prompts_outcome(fuzz_tokenizer, rows) is None


def prompts_outcome(tokenizer, rows: list[dict]) -> str | None:
    """None when the rows are refused in one line, or read as prompts with something in them whose
    columns reach a reward function beside (never instead of) its prompts and completions."""
    from gpt_recipes.train.grpo import Prompts, RewardFunc, score

    read: list = []
    refused = outcome_of(lambda: read.append(Prompts([(f"rows.jsonl row {i + 1}", row) for i, row in enumerate(rows)],
                                                     tokenizer, 48)))
    if refused or not read:
        return refused
    prompts = read[0]
    if not all(p.strip() if isinstance(p, str) else any(str(m.get("content", "")).strip() for m in p)
               for p in prompts.prompts):
        return f"an empty prompt was accepted: {prompts.prompts}"
    given = [f"completion {i}" for i in range(len(rows))]
    seen: list = []

    def reward(prompts, completions, **columns):
        seen.append((list(prompts), list(completions)))
        return [1.0] * len(completions)

    found = outcome_of(lambda: score([RewardFunc("r", reward, 1.0)], prompts.prompts, given,
                                     prompts.column_lists(list(range(len(rows))))))
    if found or seen != [(prompts.prompts, given)]:
        return found or f"the reward was given {seen[0] if seen else 'nothing'}, not the prompts and completions"
    return None


# --- Writers of one export folder -----------------------------------------------------------------
WRITER_EVENTS = st.lists(st.sampled_from(["start", "start_replace", "finish", "fail", "interrupt"]),
                         min_size=1, max_size=6)


def writers_outcome(before: str, killed_before: bool, events: list[str]) -> str | None:
    """Writers of one export folder, started, finished and failed in the order `events` gives (an
    event meets the writer open, if any): a second writer is refused in one line while one writes;
    at the end the folder holds the last finished writer's files (else what it held before), and
    nothing is left beside it once any writer has started, not even what a writer killed outright
    left (`killed_before`: its copy, and its lock file, which the kernel has unlocked)."""
    from gpt_recipes import folders
    from gpt_recipes.checkpoints.export import EXPORT_KIND

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        expected = None
        if before != "absent":
            out.mkdir()
            expected = {}
        if before in ("ours", "theirs"):
            (out / "theirs.txt").write_text(before)
            expected = {"theirs.txt": before}
            if before == "ours":
                folders.mark(out, EXPORT_KIND)
        if killed_before:
            (Path(tmp) / ".export.tmp-k1ll3d" / "model.safetensors").parent.mkdir()
            (Path(tmp) / ".export.tmp-k1ll3d" / "model.safetensors").write_text("half")
            (Path(tmp) / ".export.lock").write_text("pid 999999\n")
        writing, started = None, False
        for n, event in enumerate(events):
            if event.startswith("start"):
                writer = folders.written_aside(out, EXPORT_KIND, replace=event == "start_replace")
                try:
                    folder = writer.__enter__()
                except UserError as err:
                    if not one_line(err):
                        return f"UserError of {len(str(err).splitlines())} lines"
                    continue
                if writing is not None:
                    return "a second writer was let in while one was writing"
                (folder / "model.safetensors").write_text(f"writer {n}")
                writing, started = (writer, n), True
            elif writing is not None:
                writer, n_started = writing
                writing = None
                error = {"finish": None, "fail": OSError("disk"), "interrupt": KeyboardInterrupt()}[event]
                if error is None:
                    writer.__exit__(None, None, None)
                    expected = {"model.safetensors": f"writer {n_started}"}
                else:
                    try:
                        writer.__exit__(type(error), error, None)
                    except (OSError, KeyboardInterrupt):
                        pass  # raised again, as it should be
        if writing is not None:
            writing[0].__exit__(None, None, None)
            expected = {"model.safetensors": f"writer {writing[1]}"}
        beside = sorted(p.name for p in Path(tmp).iterdir() if p.name != "export")
        final = {p.name: p.read_text() for p in out.iterdir() if p.name != folders.MARKER} if out.exists() else None
        if started and beside:
            return f"left beside the export: {beside}"
        if final != expected:
            return f"the folder holds {final}, expected {expected}"
    return None


@given(before=st.sampled_from(["absent", "empty", "ours", "theirs"]), killed_before=st.booleans(),
       events=WRITER_EVENTS)
def test_writers_of_one_export_folder_leave_one_whole_export(before, killed_before, events):
    assert writers_outcome(before, killed_before, events) is None
