"""Export round trips: train on 2 ranks, export, reload with plain transformers in another process."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from gpt_recipes.checkpoints.consolidate import consolidated_state_dict
from tests.helpers import TOLERANCE, ds_json, hf_only, launch, pretrain_args, run_here

pytestmark = pytest.mark.slow

@pytest.mark.parametrize("stage, family, precision", [(0, "gpt2", "bf16"), (2, "llama", "fp32"), (3, "llama", "bf16")])
def test_recipe_export_round_trip(tmp_path, tiny_data, tiny_model, tiny_llama, stage, family, precision):
    out, hf = tmp_path / "run", tmp_path / "hf"
    cfg = ds_json(tmp_path, stage, micro=2, fp32=precision == "fp32")
    model = tiny_model if family == "gpt2" else tiny_llama
    launch("recipes/pretrain.py", pretrain_args(cfg, tiny_data, model, out, 6, "--eval_interval", "0",
                                                "--export_hf", str(hf)))
    names = sorted(p.name for p in hf.iterdir())
    assert names == [".gpt-recipes.json", "README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]  # the first marks it as an export of ours
    result = hf_only(hf, out / "export_check.pt")
    assert result["foreign_modules"] == []
    assert result["class"] == ("GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM")
    assert result["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
    assert result["max_logit_diff"] <= TOLERANCE[precision], result
    assert result["same_greedy_tokens"], result
    assert result["pipeline_text"].startswith("def main(")
    record = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "export_dir" in l][-1]
    assert record["export_same_greedy_tokens"] and record["export_logit_diff_vs_engine"] <= TOLERANCE[precision]
    # Gathered one weight at a time, the export is bit for bit DeepSpeed's whole-model merge, cast.
    master = consolidated_state_dict(out / "checkpoints")
    exported = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert all(torch.equal(exported[k], master[k].to(dtype)) for k in master if k in exported)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_data, tiny_model):
    """A 2-rank ZeRO-2 bf16 run with checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("zero2")
    out = tmp / "run"
    launch("recipes/pretrain.py", pretrain_args(ds_json(tmp, 2, micro=2), tiny_data, tiny_model, out, 6,
                                                "--eval_interval", "0", "--save_interval", "3"))
    return out


def test_convert_tool_named_tag_fp32_sharded(tmp_path, zero2_run):
    hf = tmp_path / "hf"
    proc = run_here("tools/convert_to_hf.py", [str(zero2_run / "checkpoints"), str(hf), "--tag", "step3",
                                                 "--dtype", "fp32", "--max_shard_size", "100KB"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Verified: reloaded logits differ" in proc.stdout and "Peak memory: " in proc.stdout
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    from safetensors import safe_open

    held, total = [], 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(hf / shard), "pt") as f:
            for name in f.keys():
                held.append(name)
                assert index["weight_map"][name] == shard
                tensor = f.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    assert sorted(held) == sorted(index["weight_map"]) and len(held) == len(set(held))  # each tensor once
    assert index["metadata"]["total_size"] == total
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.dtype == torch.float32
    master = consolidated_state_dict(zero2_run / "checkpoints", "step3")
    exported = model.state_dict()
    assert max((exported[k] - master[k]).abs().max().item() for k in master if k in exported) == 0.0
    latest = consolidated_state_dict(zero2_run / "checkpoints")  # step6: training moved the weights
    assert any(not torch.equal(master[k], latest[k]) for k in master)


def test_convert_tool_defaults_to_latest_and_training_precision(tmp_path, zero2_run):
    hf = tmp_path / "hf"
    proc = run_here("tools/convert_to_hf.py", [str(zero2_run), str(hf)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Saving weights in bf16: the training precision (bf16)" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.dtype == torch.bfloat16
    master = consolidated_state_dict(zero2_run / "checkpoints", "step6")
    exported = model.state_dict()
    assert all(torch.equal(exported[k], master[k].to(torch.bfloat16)) for k in master if k in exported)


def _broken_copy(tmp_path, zero2_run, remove):
    copy = tmp_path / "ckpt"
    shutil.copytree(zero2_run / "checkpoints", copy)
    for name in remove:
        (copy / "step6" / name).unlink()
    return copy


@pytest.mark.parametrize("case", ["not a checkpoint", "no such tag", "no config", "no tokenizer", "adapter of a whole model",
                                  "output exists"])
def test_bad_inputs(tmp_path, zero2_run, case):
    out = tmp_path / "hf"
    args = [str(zero2_run), str(out)]
    if case == "not a checkpoint":
        (tmp_path / "empty").mkdir()
        args, pattern = [str(tmp_path / "empty"), str(out)], "is not a DeepSpeed checkpoint folder"
    elif case == "no such tag":
        args, pattern = [*args, "--tag", "step99"], r"no checkpoint tagged 'step99' \(available: step3, step6\)"
    elif case == "no config":
        args, pattern = [str(_broken_copy(tmp_path, zero2_run, ["config.json"])), str(out)], \
            r"step6 is damaged: config.json is missing; the newest intact checkpoint is step3: export it with --tag step3"
    elif case == "no tokenizer":
        copy = _broken_copy(tmp_path, zero2_run, ["tokenizer.json", "tokenizer_config.json"])
        args, pattern = [str(copy), str(out)], r"step6 is damaged: tokenizer.json is missing; .* --tag step3"
    elif case == "adapter of a whole model":
        args, pattern = [*args, "--adapter"], "--adapter: checkpoint .* holds a whole model, not LoRA adapters"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        pattern = "is not empty; choose another or pass --overwrite"
    proc = run_here("tools/convert_to_hf.py", args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert re.search(pattern, proc.stderr.strip().splitlines()[-1]), proc.stderr
    if case == "output exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        # --overwrite (once --force, still accepted) replaces an earlier export, never a folder of anyone else's.
        proc = run_here("tools/convert_to_hf.py", [*args, "--force"])
        assert proc.returncode == 2 and "is not a Hugging Face export folder written by these tools" in proc.stderr
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        (out / "keep.txt").unlink()
        assert run_here("tools/convert_to_hf.py", args).returncode == 0
        (out / "stale.safetensors").write_text("left by hand in the export")
        proc = run_here("tools/convert_to_hf.py", [*args, "--tag", "step3", "--overwrite"])
        assert proc.returncode == 0 and (out / "model.safetensors").is_file() and not (out / "stale.safetensors").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside
    else:
        assert not out.exists()


def test_overwrite_replaces_the_run_and_a_failed_export_check_exits_nonzero(tmp_path, zero2_run, tiny_data,
                                                                             tiny_model, monkeypatch):
    """--overwrite: a fresh run whose outputs replace the previous run's (never a mix), the user's
    own files kept. An export that does not reproduce the engine ends the run with status 4 and the
    figure, and the checkpoint stays."""
    out, hf = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(zero2_run, out)
    (out / "notes.txt").write_text("mine")
    monkeypatch.setenv("GPT_RECIPES_FAULT", "export_skew@0")
    proc = launch("recipes/pretrain.py", pretrain_args(ds_json(tmp_path, 2, micro=2), tiny_data, tiny_model, out, 2,
                                                       "--eval_interval", "0", "--overwrite", "--export_hf", str(hf)),
                  check=False, launcher="deepspeed")
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert re.search(r"error: the export in \S+ does not reproduce the trained engine: max \|logits difference\| "
                     r"1(\.\d+)? \(tolerance 0\.05\), greedy tokens identical; the checkpoint in \S+ is kept",
                     proc.stderr), proc.stderr[-3000:]
    assert "--overwrite: removed the previous run's checkpoints, metrics.jsonl, config.json" in proc.stdout
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2"]  # nothing of the old run's step3/6
    assert (ckpt / "latest").read_text() == "step2" and (out / "notes.txt").read_text() == "mine"
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 2


def test_an_export_is_one_writer_that_leaves_nothing_behind(tmp_path, zero2_run, monkeypatch):
    """A second writer into the same folder is refused while the first holds it; a full disk and a
    SIGTERM each end in one line with nothing written; what a writer killed outright left beside the
    folder is swept away by the next export."""
    import os
    import signal

    import safetensors.torch

    from gpt_recipes import folders

    out = tmp_path / "hf"
    with folders._writer_lock(out):  # another export in progress into the same folder
        proc = run_here("tools/convert_to_hf.py", [str(zero2_run), str(out)])
    assert proc.returncode == 2 and re.search(r"error: output folder .*hf is being written by another command \(pid \d+\)",
                                              proc.stderr.strip()), proc.stderr
    assert not out.exists()

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full_disk)
        proc = run_here("tools/convert_to_hf.py", [str(zero2_run), str(out)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"error: writing .*hf failed: Error while serializing: No space left on device .*\(is the disk "
                     r"full\?\); nothing was written there", proc.stderr.strip()), proc.stderr

    from gpt_recipes.checkpoints import export as exporting

    consolidate = exporting.consolidated_state_dict

    def stopped_while_consolidating(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, while the folder is being written
        return consolidate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(exporting, "consolidated_state_dict", stopped_while_consolidating)
        proc = run_here("tools/convert_to_hf.py", [str(zero2_run), str(out)])
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"stopped: SIGTERM received: the export was not written, and {out} "
                                                    "is as it was")
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    killed = tmp_path / ".hf.tmp-killed"  # what a SIGKILLed export leaves: swept by the next one
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert run_here("tools/convert_to_hf.py", [str(zero2_run), str(out)]).returncode == 0
    assert (out / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_export_has_a_model_card_readable_files_and_a_quick_start_that_runs(tmp_path, zero2_run):
    """The card parses with huggingface_hub and carries the run's facts and results; every file is readable
    by group and others under umask 022; the card's quick start, run as written, generates; --card_only
    writes the card again from the run as it is now and leaves the weights alone."""
    import os
    import re
    import stat
    import subprocess
    import sys

    from huggingface_hub import ModelCard
    from transformers import GenerationConfig

    import shutil

    run, hf = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(zero2_run, run)  # its metrics gain a line below
    previous = os.umask(0o022)
    try:
        proc = run_here("tools/convert_to_hf.py", [str(run), str(hf)])
    finally:
        os.umask(previous)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in hf.iterdir():
        assert path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH) == stat.S_IRGRP | stat.S_IROTH, path.name
    card = ModelCard.load(hf / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pretrain", "full", "zero-2", "deepspeed"} <= set(data["tags"]) and data["datasets"]
    assert "base_model" not in data  # pretrained from scratch
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)
    assert "| ZeRO stage | 2 |" in card.text and "deepspeed 0.19" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, flags=re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.startswith("def main("), ran.stderr[-2000:]
    generation = GenerationConfig.from_pretrained(hf)
    assert generation.eos_token_id is not None and generation.pad_token_id is not None
    weights = (hf / "model.safetensors").stat().st_mtime_ns
    with open(run / "metrics.jsonl", "a") as metrics_file:  # an evaluation recorded after the export
        metrics_file.write(json.dumps({"step": 6, "tokens": final["tokens"], "val_loss": 1.2345}) + "\n")
    proc = run_here("tools/convert_to_hf.py", [str(run), str(hf), "--card_only"])
    assert proc.returncode == 0 and "the weights are unchanged" in proc.stdout, proc.stderr
    assert ModelCard.load(hf / "README.md").data.to_dict()["model-index"][0]["results"][0]["metrics"][0]["value"] == 1.2345
    assert (hf / "model.safetensors").stat().st_mtime_ns == weights
    refused = run_here("tools/convert_to_hf.py", [str(run), str(tmp_path), "--card_only"])
    assert refused.returncode == 2 and "is not a Hugging Face export written by these tools" in refused.stderr
