"""No host-device synchronisation in the recipe's step path between two log lines.

The runs go through tests/scripts/sync_audit.py, which records every call that makes the host
wait for a GPU (`.item()`, `bool(tensor)`, `.cpu()`, `nonzero`, ...) from the first step to
the first log line, and says whose code asked for it. The recipe's own must be none; those
inside DeepSpeed's forward, backward and step are the ones docs/deepspeed_and_launchers.md
lists, and that list must name every one seen.
"""

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, ds_json, launch, pretrain_args
from tests.scripts.sync_audit import SyncRecorder, attribute

DOC = REPO / "docs" / "deepspeed_and_launchers.md"


def _documented_sites() -> set[str]:
    """The `file:function` sites in the documented table of DeepSpeed's own syncs."""
    section = DOC.read_text().split("### What a step waits for", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(deepspeed/[\w/]+\.py:[\w<>]+)`", section))


class _Frame:
    def __init__(self, filename, name):
        self.filename, self.name = filename, name


def test_the_recorder_sees_syncs_and_names_who_asked():
    recorder = SyncRecorder()
    x = torch.arange(4.0)
    with recorder:
        x.sum().item()  # not recorded: not active
        recorder.active = True
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        x.nonzero()
        x.cpu()
        (x * 2).add_(1)  # no sync
    whats = {what for _, _, what in recorder.found}
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.tolist", "aten::nonzero", "Tensor.cpu"} <= whats
    assert sum(recorder.found.values()) >= 5 and not any("add" in w for w in whats)

    site = "/x/site-packages/"
    recipe_loop = _Frame("/work/main/gpt_recipes/train/loop.py", "_step")
    engine_step = _Frame(site + "deepspeed/runtime/engine.py", "step")
    zero_step = _Frame(site + "deepspeed/runtime/zero/stage3.py", "step")
    grad_norm = _Frame(site + "deepspeed/runtime/engine.py", "get_global_grad_norm")
    assert attribute([recipe_loop]) == ("recipe", "gpt_recipes/train/loop.py:_step")
    assert attribute([recipe_loop, engine_step, zero_step]) == ("deepspeed", "deepspeed/runtime/zero/stage3.py:step")
    owner, site_text = attribute([recipe_loop, grad_norm])  # a DeepSpeed call of the recipe's choosing
    assert owner == "recipe" and "get_global_grad_norm" in site_text


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(0, "bf16"), (3, "fp32")])
def test_no_host_sync_of_the_recipes_between_log_lines(tmp_path, tiny_data, tiny_model, stage, precision):
    out = tmp_path / "audit.json"
    cfg = ds_json(tmp_path, stage, micro=2, fp32=precision == "fp32", clip=True)
    args = pretrain_args(cfg, tiny_data, tiny_model, tmp_path / "run", 6, "--seq_len", "32", "--log_interval", "6",
                         "--eval_interval", "0", "--eval_batches", "1")
    launch("tests/scripts/sync_audit.py", [str(out), "recipes/pretrain.py", *args])
    documented = _documented_sites()
    for rank in (0, 1):
        audit = json.loads(out.with_suffix(f".rank{rank}.json").read_text())
        assert audit["steps"] == 6
        recipes = [s for s in audit["syncs"] if s["owner"] not in ("deepspeed", "transformers")]
        assert not recipes, f"the recipe makes the host wait for the device in its step path: {recipes}"
        undocumented = {s["site"] for s in audit["syncs"] if s["owner"] == "deepspeed"} - documented
        assert not undocumented, f"DeepSpeed syncs missing from {DOC.name}: {sorted(undocumented)}"


@pytest.mark.slow
def test_the_audit_catches_a_sync_the_recipe_adds(tmp_path, tiny_data, tiny_model):
    """One rank in this process, with the loop's step made to call .item(): the audit must say so."""
    script = f"""
import runpy, sys
import torch
from gpt_recipes.train.step import DataParallelStep
step = DataParallelStep.__call__
def step_with_item(*args, **kwargs):
    result = step(*args, **kwargs)
    result.loss.item()
    return result
DataParallelStep.__call__ = step_with_item
sys.argv = ["sync_audit.py", *sys.argv[1:]]
runpy.run_path({str(REPO / 'tests' / 'scripts' / 'sync_audit.py')!r}, run_name="__main__")
"""
    out = tmp_path / "audit.json"
    args = pretrain_args(ds_json(tmp_path, 0, micro=2, fp32=True), tiny_data, tiny_model, tmp_path / "run", 3,
                         "--seq_len", "32", "--log_interval", "3", "--eval_interval", "0", "--eval_batches", "1")
    proc = subprocess.run([sys.executable, "-c", script, str(out), "recipes/pretrain.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(out.read_text())["syncs"]
    assert any(s["owner"] == "recipe" and s["what"] == "Tensor.item" for s in found), found
