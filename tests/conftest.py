import os

# Nothing in the tests reaches a hub: a name that is no local folder fails at once, without retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest

from gpt_recipes.data.prepare import PrepareOptions, prepare
from gpt_recipes.data.sft_demo import build
from gpt_recipes.data.sources import default_corpus_files
from tests.helpers import CROSS_STAGE_RUNS, TINY_GPT2, TINY_LLAMA, ds_json, launch, parity_run, pretrain_args


@pytest.fixture(scope="session")
def corpus_files() -> list[str]:
    """A slice of the default corpus (the standard library's source): ~1 MB of real text."""
    files = [p for p in default_corpus_files() if p.parent.name in ("json", "email", "http", "logging", "asyncio")]
    assert files, "standard library source not found"
    return [str(p) for p in files]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_files) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareOptions(inputs=corpus_files, output=str(out), vocab_size=1024, val_fraction=0.1, num_proc=1))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny_gpt2.json"
    path.write_text(json.dumps(TINY_GPT2))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny_llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, tiny_data):
    """A tiny GPT-2 pretrained on 2 ranks and exported with --export_hf (context 128)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    model = tmp / "model.json"
    model.write_text(json.dumps({**TINY_GPT2, "n_positions": 128}))
    launch("recipes/pretrain.py", pretrain_args(ds_json(tmp, 2, micro=4), tiny_data, model, tmp / "run", 40,
                                                "--seq_len", "64", "--eval_interval", "0",
                                                "--export_hf", str(tmp / "hf")))
    return tmp / "hf"


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_demo")
    counts = build(out)
    assert counts["train"] > 1000 and counts["val"] >= 300
    return out


@pytest.fixture(scope="session")
def cross_stage(tmp_path_factory, tiny_data, tiny_model):
    """The reference (1 rank x micro-batch 4, ZeRO-0) and every run of CROSS_STAGE_RUNS, fp32 with
    gradient clipping 1.0 as the shipped JSONs have it (tests/recipes/test_pretrain.py; the eager
    side of tests/models/test_compile.py)."""
    tmp = tmp_path_factory.mktemp("cross_stage")
    reference = parity_run(tmp, tiny_data, tiny_model, 0, 1, 4, 1, True, "reference zero0 1x4")
    return reference, {label: parity_run(tmp, tiny_data, tiny_model, *spec, label)
                       for label, *spec in CROSS_STAGE_RUNS}


def pytest_addoption(parser):
    parser.addoption("--docs-walk", action="store_true",
                     help="also run every recipe command the docs show through its first optimizer step")


def pytest_collection_modifyitems(config, items):
    """The docs walk starts each documented command for real (`make test-docs`); the suite leaves it out."""
    if config.getoption("--docs-walk"):
        return
    skip = pytest.mark.skip(reason="the docs walk runs with `make test-docs` (--docs-walk)")
    for item in items:
        if "docs_walk" in item.keywords:
            item.add_marker(skip)
