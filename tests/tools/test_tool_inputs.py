"""Bad flags and files for every tool: one line naming the problem, status 2, and nothing written
over a file the tool was given to read. The tools run in this process (as `python tools/X.py`
would run them) so the many cases stay fast."""

import json
import re
import runpy
import shutil
import sys

import pytest

from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.models.causal_lm import build_config, build_model
from tests.helpers import REPO


def tool_error(monkeypatch, capsys, script: str, *argv: str) -> str:
    """Run tools/<script> (or a path from the repository root) with argv; it must stop with status 2
    and one `error:` line, which is returned."""
    path = REPO / script if "/" in script else REPO / "tools" / script
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, argv)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(path), run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tiny_data, tiny_model):
    """A tiny model folder as an export leaves it (context 64)."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    tokenizer = load_tokenizer(tiny_data / "tokenizer")
    build_model(build_config(str(tiny_model), len(tokenizer), tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def run_copy(tmp_path):
    """A run folder holding a real run's metrics."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(REPO / "tests" / "fixtures" / "recipe_zero0_metrics.jsonl", run / "metrics.jsonl")
    return run


@pytest.mark.parametrize("flags, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be at least 1, got -1"),
    (["--max_new_tokens", "5000"], r"the prompt is \d+ tokens and the model reads at most 64: --max_new_tokens can be "
                                   r"at most \d+, got 5000"),
    (["--temperature", "-1"], "--temperature must be 0 \\(greedy\\) or positive, got -1.0"),
    (["--top_p", "0"], r"--top_p must lie in \(0, 1\], got 0.0"),
    (["--repetition_penalty", "0"], "--repetition_penalty must be positive, got 0.0"),
    (["--chat"], "has no chat template; drop --chat"),
    (["--temperature", "0", "--repetition_penalty", "1.1"], "--repetition_penalty applies when sampling; --temperature "
                                                            "0 decodes greedily"),
])
def test_generate(monkeypatch, capsys, hf_model, flags, match):
    assert re.search(match, tool_error(monkeypatch, capsys, "generate.py", hf_model, *flags))


def test_summarize_never_writes_over_what_it_reads(monkeypatch, capsys, run_copy):
    before = (run_copy / "metrics.jsonl").read_text()
    line = tool_error(monkeypatch, capsys, "summarize_throughput.py", run_copy, "--csv", run_copy / "metrics.jsonl")
    assert "is also RUN_DIR, an input; give it a path of its own" in line
    assert (run_copy / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("flags, match", [
    (["--warmup_steps", "-5"], "--warmup_steps must be 0 or positive, got -5"),
    (["--plots", "{file}"], "--plots .*notes.txt exists and is not a folder"),
    (["--csv", "{file}/x.csv"], "cannot create --csv .*notes.txt/x.csv: .*notes.txt is a file"),
    (["--csv", "{dir}"], "--csv .* is a folder; give the name of a file to write"),
    (["--plots", "/proc/x/plots"], "cannot write --plots /proc/x/plots: /proc does not take new files"),
])
def test_summarize_flags(monkeypatch, capsys, tmp_path, run_copy, flags, match):
    (tmp_path / "notes.txt").write_text("mine")
    flags = [f.format(file=tmp_path / "notes.txt", dir=tmp_path) for f in flags]
    assert re.search(match, tool_error(monkeypatch, capsys, "summarize_throughput.py",
                                                              run_copy, *flags))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags, match", [
    (["--gpu_mem", "-1"], "--gpu_mem must be positive, got -1.0"),
    (["--host_mem", "0"], "--host_mem must be positive, got 0.0"),
    (["--micro_batch", "0"], "--micro_batch must be positive, got 0"),
    (["--ranks", "0"], "--ranks and --nodes must be at least 1"),
])
def test_plan_memory_flags(monkeypatch, capsys, flags, match):
    assert match in tool_error(monkeypatch, capsys, "plan_memory.py", *flags)


@pytest.mark.parametrize("script, flags, match", [
    ("tools/sweep_configs.py", ["--ranks", "0"], "--ranks must be at least 1, got 0"),
    ("tools/sweep_configs.py", ["--max_steps", "0"], "--max_steps must be at least 1, got 0"),
    ("benchmarks/benchmark.py", ["--ranks", "0"], "--ranks must be at least 1, got 0"),
    ("benchmarks/benchmark.py", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
])
def test_run_counts_of_the_measuring_tools(monkeypatch, capsys, tmp_path, script, flags, match):
    assert match in tool_error(monkeypatch, capsys, script, *flags, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_shard_size_that_does_not_parse(monkeypatch, capsys, tmp_path):
    line = tool_error(monkeypatch, capsys, "convert_to_hf.py", tmp_path / "run", tmp_path / "hf", "--max_shard_size",
                      "abc")
    assert "--max_shard_size 'abc' is not a positive size such as 2GB, 500MB or 100KB" in line


@pytest.mark.parametrize("script, flags, match", [
    ("prepare_data.py", ["--vocab_size", str(10**9)], "--vocab_size 1000000000 is beyond reason"),
    ("train_tokenizer.py", ["--vocab_size", str(10**9)], "--vocab_size 1000000000 is beyond reason"),
    ("prepare_data.py", ["--num_proc", "-1"], "--num_proc must be 0 \\(automatic\\) or positive, got -1"),
    ("prepare_data.py", ["--output", "{file}"], "--output_dir .*notes.txt exists and is not a folder"),
    ("prepare_data.py", ["--output_dir", "{file}/data"], "cannot create --output_dir .*notes.txt/data: .*is a file"),
    ("train_tokenizer.py", ["--output", "{file}/tok"], "cannot create --output_dir .*notes.txt/tok: .*is a file"),
])
def test_preparation_flags(monkeypatch, capsys, tmp_path, script, flags, match):
    (tmp_path / "notes.txt").write_text("mine")
    source = tmp_path / "source.txt"
    source.write_text("def f():\n    return 1\n" * 100)
    flags = [f.format(file=tmp_path / "notes.txt") for f in flags]
    assert re.search(match, tool_error(monkeypatch, capsys, script, source, *flags))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prepare_text_that_is_not_text(monkeypatch, capsys, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": 5}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    line = tool_error(monkeypatch, capsys, "prepare_data.py", rows, "--output", tmp_path / "data", "--vocab_size", "300")
    assert "field 'text' holds Json, not text; see --text_field" in line


# No tool writes onto its inputs or into a run's checkpoints; every output is checked before any work.
def test_evaluate_never_writes_into_the_model_it_reads(monkeypatch, capsys, hf_model, tmp_path):
    config = (hf_model / "config.json").read_text()
    line = tool_error(monkeypatch, capsys, "evaluate.py", hf_model, "--output", hf_model / "config.json")
    assert "--output" in line and "is inside MODEL_OR_CHECKPOINT" in line
    assert (hf_model / "config.json").read_text() == config
    line = tool_error(monkeypatch, capsys, "evaluate.py", hf_model, "--output", tmp_path)
    assert "is a folder; give the name of a file to write" in line


def _fake_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step6").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"recipe": "pretrain"}))
    return run


def test_convert_never_writes_into_the_run_it_reads(monkeypatch, capsys, tmp_path):
    run = _fake_run(tmp_path)
    line = tool_error(monkeypatch, capsys, "convert_to_hf.py", run, run / "checkpoints" / "step6")
    assert "is inside CHECKPOINT_DIR" in line
    line = tool_error(monkeypatch, capsys, "convert_to_hf.py", tmp_path / "elsewhere", run / "checkpoints" / "exp")
    assert "is inside the checkpoints of the run" in line and "saves and rotation manage" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step6"]


@pytest.mark.parametrize("script, make_flags, match", [
    ("prepare_data.py", lambda d: [d / "corpus", "--output", d / "corpus" / "data"], "is inside INPUT"),
    ("prepare_data.py", lambda d: [d / "corpus" / "a.txt", "--output", d / "corpus"], "holds INPUT"),
    ("train_tokenizer.py", lambda d: [d / "corpus", "--output", d / "corpus"], "is also INPUT"),
    ("prepare_data.py", lambda d: [d / "corpus", "--output", "/proc/x/data"], "/proc does not take new files"),
])
def test_preparation_never_writes_onto_its_inputs(monkeypatch, capsys, tmp_path, script, make_flags, match):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("def f(x):\n    return x\n" * 50)
    assert re.search(match, tool_error(monkeypatch, capsys, script, *make_flags(tmp_path)))
    assert (tmp_path / "corpus" / "a.txt").read_text().startswith("def f(x)")


def test_summarize_a_metrics_file_that_is_not_text(monkeypatch, capsys, run_copy):
    (run_copy / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\n')
    line = tool_error(monkeypatch, capsys, "summarize_throughput.py", run_copy)
    assert "metrics.jsonl is not UTF-8 text" in line


# The wrong kind of folder gets a one-line pointer.
def test_generate_from_a_checkpoint_folder_says_to_export_it(monkeypatch, capsys, hf_model, tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step6"
    step.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_model / name, step / name)
    (step / "training.json").write_text(json.dumps({"step": 6}))
    (step / "mp_rank_00_model_states.pt").write_bytes(b"shards")
    for folder, kind in ((step, "a training checkpoint"), (step.parent, "a checkpoints folder"),
                         (tmp_path / "run", "a run folder")):
        line = tool_error(monkeypatch, capsys, "generate.py", folder)
        assert f"is {kind} of these recipes, not a Hugging Face model folder; export it first: " \
               f"python tools/convert_to_hf.py {folder} OUT_DIR" in line


@pytest.mark.parametrize("change, match", [
    ({"vocab_size": 4096}, "holds transformer.wte.weight of shape \\[1024, 64\\], but .*config.json makes it "
                           "\\[4096, 64\\]; the config does not belong to these weights"),
    ({"vocab_size": "1024"}, "could not load the model config of"),
    ({"n_embd": 32}, "the config does not belong to these weights"),
])
def test_a_config_that_disagrees_with_its_weights(monkeypatch, capsys, hf_model, tmp_path, change, match):
    folder = tmp_path / "model"
    shutil.copytree(hf_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    assert re.search(match, tool_error(monkeypatch, capsys, "generate.py", folder))


def test_generate_says_its_decoding_and_temperature_0_is_plain_greedy(monkeypatch, capsys, hf_model):
    """The first line names the decoding; --temperature 0 gives what transformers' greedy search gives."""
    import torch
    from transformers import AutoModelForCausalLM

    path = REPO / "tools" / "generate.py"
    monkeypatch.setattr(sys, "argv", [str(path), str(hf_model), "--prompt", "def", "--max_new_tokens", "12",
                                      "--temperature", "0"])
    runpy.run_path(str(path), run_name="__main__")
    first, text = capsys.readouterr().out.split("\n", 1)
    assert first == "Decoding: greedy (--temperature 0), up to 12 new tokens"
    tokenizer = load_tokenizer(hf_model)
    ids = tokenizer("def", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(hf_model).generate(ids, max_new_tokens=12, do_sample=False,
                                                                      pad_token_id=tokenizer.eos_token_id)
    assert text.rstrip("\n") == "def" + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    monkeypatch.setattr(sys, "argv", [str(path), str(hf_model), "--prompt", "def", "--max_new_tokens", "12"])
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.startswith("Decoding: sampling at temperature 0.8, top_p 0.95, repetition penalty "
                                              "1.1, seed 0 (--temperature 0: greedy)")
