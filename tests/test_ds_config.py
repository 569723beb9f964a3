import json
import re
from pathlib import Path

import pytest

from gpt_recipes import ds_config
from gpt_recipes.errors import UserError
from gpt_recipes.parallel.layout import Layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_batch_is_derived_from_any_two_values():
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    plan = ds_config.resolve_batch(cfg, Layout(world=2))
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (4, 2, 16)
    assert cfg["train_batch_size"] == 16
    assert ds_config.resolve_batch({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, Layout(2)).grad_accum == 2
    assert ds_config.resolve_batch({"train_batch_size": 16, "gradient_accumulation_steps": 4}, Layout(2)).micro_batch == 2


@pytest.mark.parametrize("cfg, match", [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}, "!="),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, "not divisible"),
    ({"train_batch_size": 9, "gradient_accumulation_steps": 2}, "not divisible"),
    ({"gradient_accumulation_steps": 2}, "set train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 0}, "positive integer"),
    ({"train_micro_batch_size_per_gpu": "8"}, "positive integer"),
])
def test_batch_sizes_that_do_not_add_up(cfg, match):
    with pytest.raises(UserError, match=match):
        ds_config.resolve_batch(cfg, Layout(world=2))


def test_auto_values_are_filled_and_reported():
    cfg = {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}}
    filled = ds_config.fill_auto(cfg, max_steps=200)
    assert cfg["scheduler"]["params"] == {"total_num_steps": 200, "warmup_num_steps": 10}
    assert filled == {"scheduler.params.total_num_steps": 200, "scheduler.params.warmup_num_steps": 10}


def test_auto_is_refused_where_the_json_owns_the_value():
    with pytest.raises(UserError, match="optimizer.params.lr is 'auto'"):
        ds_config.fill_auto({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, max_steps=10)


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(UserError, match="fp16 is not supported on CPU.*bf16"):
        ds_config.check_device_support({"fp16": {"enabled": True}}, "cpu")
    ds_config.check_device_support({"fp16": {"enabled": True}}, "cuda")


def test_precision_and_stage():
    assert ds_config.precision({"bf16": {"enabled": True}}) == "bf16"
    assert ds_config.precision({}) == "fp32"
    with pytest.raises(UserError, match="both bf16 and fp16"):
        ds_config.precision({"bf16": {"enabled": True}, "fp16": {"enabled": True}})
    with pytest.raises(UserError, match="stage must be"):
        ds_config.zero_stage({"zero_optimization": {"stage": 4}})


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ds_config.load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4,,}')
    with pytest.raises(UserError, match="not valid JSON.*line 1"):
        ds_config.load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        ds_config.load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    raw = json.loads(path.read_text())
    device = "cuda" if ds_config.precision(raw) == "fp16" else "cpu"
    cfg, plan, filled = ds_config.resolve(path, world_size=2, max_steps=100, device_type=device)
    if plan.layout.tensor == 1:
        assert plan.global_batch == cfg["train_batch_size"]
    else:  # DeepSpeed would check it against every rank, though a tensor-parallel group shares its samples
        assert "train_batch_size" not in cfg and plan.global_batch == cfg["train_micro_batch_size_per_gpu"]
    assert "scheduler.params.total_num_steps" in filled
    # The JSON, not the recipe, owns optimizer and precision: nothing else may be "auto".
    assert '"auto"' not in json.dumps(cfg)


def test_shipped_configs_cover_the_stages_and_precisions():
    raws = {p.stem: json.loads(p.read_text()) for p in CONFIGS}
    assert {ds_config.zero_stage(raws[f"zero{s}"]) for s in range(4)} == {0, 1, 2, 3}
    assert all(ds_config.precision(raws[f"zero{s}"]) == "bf16" for s in range(4))
    assert any(ds_config.precision(r) == "fp16" and r["fp16"].get("loss_scale") == 0 for r in raws.values())
    assert any("offload_optimizer" in r["zero_optimization"] for r in raws.values())
    # DeepSpeed picks FusedAdam on GPU and DeepSpeedCPUAdam under offload for these types
    # unless "torch_adam" forces torch's optimizer.
    assert all(r["optimizer"]["type"] in ("Adam", "AdamW") and "torch_adam" not in r["optimizer"]["params"]
               for r in raws.values())


def test_monitor_output_paths_default_into_the_run(tmp_path):
    cfg = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "auto"},
           "wandb": {"enabled": False}}
    filled = ds_config.fill_auto(cfg, max_steps=10, monitor_dir=tmp_path / "run" / "monitor")
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run" / "monitor"),
                                  "job_name": "tensorboard"}
    assert cfg["csv_monitor"]["output_path"] == str(tmp_path / "run" / "monitor")
    assert set(filled) == {"tensorboard.output_path", "csv_monitor.output_path"}
    given = {"tensorboard": {"enabled": True, "output_path": "/elsewhere", "job_name": "x"}}
    assert ds_config.fill_auto(given, max_steps=10, monitor_dir=tmp_path) == {} and given["tensorboard"]["output_path"] == "/elsewhere"


def test_monitor_without_its_package_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="wandb monitor.*pip install wandb"):
        ds_config.enabled_monitors({"wandb": {"enabled": True}})
    assert ds_config.enabled_monitors({"wandb": {"enabled": False}, "csv_monitor": {"enabled": True}}) == ["csv_monitor"]


def test_config_from_accelerate_launch(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    assert ds_config.config_path(None, "ds_configs/zero2.json") == "ds_configs/zero2.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds_configs/zero3.json")
    assert ds_config.config_path(None, "ds_configs/zero2.json") == "ds_configs/zero3.json"
    assert ds_config.config_path("./ds_configs/zero3.json", "ds_configs/zero2.json") == "./ds_configs/zero3.json"
    with pytest.raises(UserError, match="differs from accelerate"):
        ds_config.config_path("ds_configs/zero1.json", "ds_configs/zero2.json")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="config decides precision"):
        ds_config.check_launcher_precision({"bf16": {"enabled": True}})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    ds_config.check_launcher_precision({"bf16": {"enabled": True}})


def _shipped(**changes):
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("changes, match", [
    ({"optimizer": {"type": "Adamm", "params": {"lr": 1e-3}}},
     "optimizer type 'Adamm' is neither a DeepSpeed optimizer nor one of torch.optim's \\(did you mean 'adam'\\?\\)"),
    ({"optimizer": {"params": {"lr": 1e-3}}}, "the optimizer section needs a \"type\""),
    ({"optimizer": None}, "the optimizer section needs a \"type\""),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1e-3}}}, "optimizer.params.lr must be a positive number, got -0.001"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, "optimizer.params.lr must be a positive number"),
    ({"scheduler": {"type": "Cosine", "params": {}}}, "scheduler type 'Cosine' is not one DeepSpeed knows"),
    ({"gradient_clipping": -1}, "gradient_clipping must be a number >= 0"),
    ({"bf16": True}, "bf16 must be a JSON object"),
    ({"zero_optimization": 2}, "zero_optimization must be a JSON object"),
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'"),
])
def test_training_sections_deepspeed_would_reject_late(changes, match):
    with pytest.raises(UserError, match=match):
        ds_config.check_training_sections(_shipped(**changes))


def test_torch_optimizers_by_name_are_accepted():
    ds_config.check_training_sections(_shipped(optimizer={"type": "SGD", "params": {"lr": 0.1}}))


@pytest.mark.parametrize("zero, match", [
    ({"stage": 2, "stgae": 2}, "DeepSpeedZeroConfig rejects it: stgae: Extra inputs are not permitted"),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}},
     "DeepSpeedZeroConfig rejects it: offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme'"),
])
def test_deepspeeds_own_parser_runs_before_the_ranks(tmp_path, zero, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_shipped(zero_optimization=zero)))
    with pytest.raises(UserError, match=match):
        ds_config.resolve(path, world_size=2, max_steps=10, device_type="cpu")


# The run is what its JSON says: parsed as DeepSpeed parses it, checked against the optimizer's and
# scheduler's own signatures, and compared with what the engine runs (tests/test_runner.py).
def _write_with(tmp_path, edit=None, text=None) -> Path:
    cfg = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    if edit:
        edit(cfg)
    path = tmp_path / "c.json"
    if text is None:
        path.write_text(json.dumps(cfg))
    else:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _set(keys: str, value):
    def edit(cfg):
        *parents, last = keys.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return edit


JSON_AS_DEEPSPEED_READS_IT = {
    "duplicated key": (dict(text='{"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2, '
                                 '"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}'),
                       "zero_optimization.stage appears twice"),
    "string for a boolean": (dict(edit=_set("bf16.enabled", "false")),
                             'bf16.enabled must be true or false, not "false"'),
    "boolean for the stage": (dict(edit=_set("zero_optimization.stage", True)),
                              "zero_optimization.stage must be an integer, not true"),
    "string for a number": (dict(edit=_set("zero_optimization.reduce_bucket_size", "5e8")),
                            'zero_optimization.reduce_bucket_size must be an integer, not "5e8"'),
    "a section as a scalar": (dict(edit=_set("zero_optimization.offload_optimizer", "cpu")),
                              "zero_optimization.offload_optimizer must be a JSON object"),
    "nvme offload without a path": (dict(edit=_set("zero_optimization.offload_optimizer", {"device": "nvme"})),
                                    "offload_optimizer.device is nvme but no nvme_path"),
    "betas as one number": (dict(edit=_set("optimizer.params.betas", 0.9)),
                            "optimizer.params.betas must be a list of 2 numbers, not 0.9"),
    "unknown optimizer parameter": (dict(edit=_set("optimizer.params.weight_dcay", 0.1)),
                                    "optimizer.params.weight_dcay is not a parameter of AdamW.*weight_decay"),
    "unknown scheduler parameter": (dict(edit=_set("scheduler.params.warmup_iters", 10)),
                                    "scheduler.params.warmup_iters is not a parameter of WarmupCosineLR"),
    "scheduler number as text": (dict(edit=_set("scheduler.params.cos_min_ratio", "0.1")),
                                 'scheduler.params.cos_min_ratio must be a number, not "0.1"'),
    "not UTF-8": (dict(text=b'{"train_micro_batch_size_per_gpu": 2, "x": "\xff"}'), "is not UTF-8 text"),
    "a boolean batch size": (dict(edit=_set("train_micro_batch_size_per_gpu", True)), "positive integer"),
}


@pytest.mark.parametrize("case", JSON_AS_DEEPSPEED_READS_IT)
def test_the_json_is_read_as_deepspeed_reads_it(tmp_path, case):
    how, match = JSON_AS_DEEPSPEED_READS_IT[case]
    with pytest.raises(UserError, match=match):
        ds_config.resolve(_write_with(tmp_path, **how), world_size=2, max_steps=10, device_type="cpu")


def test_what_deepspeed_accepts_as_written_still_resolves(tmp_path):
    path = _write_with(tmp_path, _set("zero_optimization.offload_optimizer", {"device": "nvme",
                                                                              "nvme_path": str(tmp_path)}))
    cfg, _, _ = ds_config.resolve(path, world_size=2, max_steps=10, device_type="cpu")
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    # torch's own optimizers take their own parameters
    ds_config.check_training_sections(_shipped(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}))
    with pytest.raises(UserError, match="optimizer.params.betas is not a parameter of SGD"):
        ds_config.check_training_sections(_shipped(optimizer={"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.9]}}))


def test_ds_overrides_change_the_json_for_one_run_and_are_checked_like_it(tmp_path):
    path = REPO / "ds_configs" / "zero2.json"
    cfg, plan, _ = ds_config.resolve(path, 2, 10, "cpu", overrides=[
        "optimizer.params.lr=3e-4", "train_micro_batch_size_per_gpu=2", "optimizer.params.betas=[0.9,0.99]",
        "zero_optimization.offload_optimizer.device=cpu"])
    assert cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.99]
    assert plan.micro_batch == 2 and cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert json.loads(path.read_text())["optimizer"]["params"]["lr"] == 0.001  # the file is untouched
    assert ds_config.apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=text"]) == {"a.b": (1, 2), "a.c": ("(not set)",
                                                                                                  "text")}
    for bad, match in (("lr", "give KEY.PATH=VALUE"), ("gradient_clipping.x=1", "gradient_clipping is not a section"),
                       ("bf16.enabled=\"false\"", 'bf16.enabled must be true or false, not "false"'),
                       ("optimizer.params.lr=-1", "optimizer.params.lr must be a positive number")):
        with pytest.raises(UserError, match=match):
            ds_config.resolve(path, 2, 10, "cpu", overrides=[bad])
    # Given twice, the note still says what the JSON held.
    assert ds_config.apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.b=3"]) == {"a.b": (1, 3)}


@pytest.mark.parametrize("override, message", [
    ("lr=0.5", "lr is not a key DeepSpeed reads, so it would change nothing; did you mean optimizer.params.lr?"),
    ("optimizer.lr=0.5", "optimizer.lr is not a key DeepSpeed reads, so it would change nothing; did you mean "
                         "optimizer.params.lr?"),
    ("foo.bar=1", "foo is not a key DeepSpeed reads"),
    ("pipeline.stage=2", "pipeline.stage is not a key DeepSpeed reads, so it would change nothing; did you mean "
                         "pipeline.stages?"),
    ("pipeline.partition_method=\"uniform\"", "did you mean pipeline.partition?"),
    ("gradient_clippin=0.5", "gradient_clipping"),
    ("checkpoint.load_universl=true", "did you mean checkpoint.load_universal?"),
    ("activation_checkpointing.partition_activation=true", "did you mean "
                                                           "activation_checkpointing.partition_activations?"),
    ("expert_parallel.enabld=true", "did you mean expert_parallel.enabled?"),
])
def test_a_key_deepspeed_does_not_read_is_one_line(override, message):
    """DeepSpeed ignores such keys: the run would train as if they were absent."""
    with pytest.raises(UserError, match=re.escape(message)):
        ds_config.resolve(REPO / "ds_configs" / "zero2.json", 2, 10, "cpu", overrides=[override])


@pytest.mark.parametrize("extra", [{"activation_checkpointing": {"partition_activations": True}},
                                   {"checkpoint": {"load_universal": False}}, {"wandb": {"enabled": False}},
                                   {"data_types": {"grad_accum_dtype": "fp32"}}, {"flops_profiler": {"enabled": False}},
                                   {"expert_parallel": {"enabled": False}}, {"pipeline": {"stages": 1}}])
def test_keys_deepspeed_reads_pass(tmp_path, extra):
    ds_config.resolve(_write_with(tmp_path, lambda cfg: cfg.update(extra)), 2, 10, "cpu")
