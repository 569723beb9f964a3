import pytest

from gpt_recipes.args import PretrainArgs
from gpt_recipes.errors import UserError
from gpt_recipes.runner import plan_run


@pytest.mark.parametrize("flags, match", [
    ({"max_steps": 0}, "--max_steps must be at least 1"),
    ({"log_interval": 0}, "--log_interval must be at least 1"),
    ({"save_interval": -1}, "--save_interval must be 0"),
    ({"keep_last": -1}, "--keep_last must be 0 \\(keep all\\) or positive, got -1"),
    ({"seed": -3}, "--seed must lie between 0 and 2\\*\\*32 - 1, got -3"),
    ({"peak_tflops": -5.0}, "--peak_tflops must be positive, got -5.0"),
    ({"router_aux_loss_coef": -1.0}, "--router_aux_loss_coef must be at least 0, got -1.0"),
    ({"output_dir": "{file}/run"}, "cannot create --output_dir .*/notes.txt/run: .*/notes.txt is a file"),
    ({"export_hf": "{file}/hf"}, "cannot create --export_hf .*/notes.txt/hf: .*/notes.txt is a file"),
    ({"output_dir": "/proc/x/run"}, "cannot write --output_dir /proc/x/run: /proc does not take new files"),
    ({"export_hf": "{out}"}, "--export_hf .*/out is also --output_dir, another output of this command; give it a "
                             "path of its own"),
    ({"export_hf": "{out}/hf"}, "--export_hf .*/out/hf is inside --output_dir .*/out, another output"),
    ({"output_dir": "{data}/run"}, "--output_dir .*/run is inside --data .*, an input"),
])
def test_bad_run_flags(tmp_path, flags, match):
    (tmp_path / "notes.txt").write_text("a file where a folder is asked for")
    data = tmp_path / "data"
    data.mkdir()
    flags = {"data": [str(data)], **{k: v.format(file=tmp_path / "notes.txt", out=tmp_path / "out", data=data)
                                     if isinstance(v, str) else v for k, v in flags.items()}}
    with pytest.raises(UserError, match=match):
        plan_run(PretrainArgs(**{"output_dir": str(tmp_path / "out"), **flags}))


def test_export_folder_is_checked_before_training(tmp_path):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "weights.safetensors").write_text("someone's model")
    with pytest.raises(UserError, match="is not empty; choose another or pass --overwrite"):
        plan_run(PretrainArgs(output_dir=str(tmp_path / "out"), export_hf=str(export)))


def test_overwrite_never_replaces_an_export_folder_that_is_not_ours(tmp_path):
    export = tmp_path / "models"
    export.mkdir()
    (export / "weights.safetensors").write_text("someone's model")
    with pytest.raises(UserError, match="is not a Hugging Face export folder written by these tools, so --overwrite"):
        plan_run(PretrainArgs(output_dir=str(tmp_path / "out"), export_hf=str(export), overwrite=True))
    assert [p.name for p in export.iterdir()] == ["weights.safetensors"]


# Resume checks what it resumes, before any rank starts.
@pytest.fixture
def resumable(tmp_path, tiny_data, tiny_model):
    """A run folder whose latest checkpoint holds the model config, tokenizer and training facts of a
    tiny pretraining run (global batch 8 on one rank with the default JSON, seq_len 64)."""
    import json

    from gpt_recipes.data.tokenizer import load_tokenizer
    from gpt_recipes.models.causal_lm import build_config

    tokenizer = load_tokenizer(tiny_data / "tokenizer")
    config = build_config(str(tiny_model), len(tokenizer), tokenizer.eos_token_id)
    out = tmp_path / "run"
    tag = out / "checkpoints" / "step4"
    tag.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"recipe": "pretrain"}))
    config.save_pretrained(tag)
    tokenizer.save_pretrained(tag)
    (tag / "training.json").write_text(json.dumps({"step": 4, "tokens": 2048, "global_batch": 8, "seq_len": 64,
                                                   "data_fingerprint": "data-a"}))
    (out / "checkpoints" / "latest").write_text("step4")
    return out, config, tokenizer


def _resume(out, config, tokenizer, seq_len=64, fingerprint="data-a", **flags):
    from gpt_recipes.runner import Job, check_job
    from gpt_recipes.train.lm import NextToken

    args = PretrainArgs(output_dir=str(out), resume=True, **flags)
    run = plan_run(args)
    check_job(args, run, Job("pretrain", NextToken(), config, tokenizer, seq_len, None, data_fingerprint=fingerprint))


def test_a_resume_of_the_same_run_passes(resumable):
    _resume(*resumable)


def test_a_resume_with_another_model_size_is_one_line(resumable):
    out, config, tokenizer = resumable
    other = config.__class__(**{**config.to_dict(), "n_layer": 3})
    with pytest.raises(UserError, match="was trained with another model: n_layer 2 \\(this run: 3\\); resume with the "
                                        "model it was trained with"):
        _resume(out, other, tokenizer)


def test_a_resume_with_another_tokenizer_of_the_same_size_is_one_line(resumable):
    from types import SimpleNamespace

    out, config, tokenizer = resumable
    vocab = tokenizer.get_vocab()
    a, b = sorted(vocab)[10:12]
    swapped = SimpleNamespace(get_vocab=lambda: {**vocab, a: vocab[b], b: vocab[a]})  # same size, other ids
    with pytest.raises(UserError, match="another tokenizer .*tools/prepare_data.py --tokenizer"):
        _resume(out, config, swapped)
    info = out / "checkpoints" / "step4" / "training.json"  # a checkpoint from before digests were recorded:
    assert "tokenizer_digest" not in info.read_text()  # its own tokenizer files are compared
    _resume(out, config, tokenizer)


@pytest.mark.parametrize("change, match", [
    ({"fingerprint": "data-b"}, "was trained with other data \\(fingerprint data-a, this run's data-b\\)"),
    ({"seq_len": 32}, "was trained with global batch 8 and seq_len 64; this run has 8 and 32"),
])
def test_a_resume_on_other_data_or_batch_is_one_line(resumable, change, match):
    with pytest.raises(UserError, match=match):
        _resume(*resumable, **change)


def test_num_epochs_sets_the_run_length_and_the_schedule(tmp_path):
    from gpt_recipes.runner import make_mixture_batches, plan_epochs

    args = PretrainArgs(output_dir=str(tmp_path / "out"), num_epochs=2.5, max_steps=7)
    run = plan_run(args)
    global_batch = run.batch.global_batch
    plan_epochs(args, run, 100)
    steps = -(-250 // global_batch)  # 2.5 passes over 100 samples, rounded up to a whole step
    assert run.max_steps == steps and args.max_steps == 7  # derived and recorded, the flag as given
    assert run.ds_cfg["scheduler"]["params"]["total_num_steps"] == steps
    assert run.filled["scheduler.params.total_num_steps"] == steps
    assert any(f"make {steps} steps" in note for note in run.notes)
    with pytest.raises(UserError, match="--num_epochs must be positive"):
        PretrainArgs(output_dir=str(tmp_path / "out2"), num_epochs=0)
    with pytest.raises(UserError, match="a weighted mixture passes over each source at its own rate"):
        make_mixture_batches(args, run, [], [], 64)


def test_a_resume_in_another_precision_or_with_other_objective_settings_is_one_line(resumable):
    import json

    from gpt_recipes.runner import Job, check_job
    from gpt_recipes.train.lm import NextToken

    out, config, tokenizer = resumable
    info_path = out / "checkpoints" / "step4" / "training.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "precision": "fp32"}))
    with pytest.raises(UserError, match="was trained with fp32, and this run is bf16: resume in fp32"):
        _resume(out, config, tokenizer)

    class Tuned(NextToken):  # an objective with settings of its own, as DPO, KTO and GRPO have
        title = "KTO"

        def config_record(self):
            return {"kto": {"beta": 0.1, "desirable_weight": 1.0}}

    info_path.write_text(json.dumps({**info, "kto": {"beta": 0.5, "desirable_weight": 1.0}}))
    args = PretrainArgs(output_dir=str(out), resume=True)
    with pytest.raises(UserError, match=r"was trained with other KTO settings \(beta 0.5 -> 0.1\); resume with the ones"):
        check_job(args, plan_run(args), Job("kto", Tuned(), config, tokenizer, 64, None, data_fingerprint="data-a"))


def test_resume_from_a_path_outside_the_run_is_refused(resumable):
    out, _, _ = resumable
    with pytest.raises(UserError, match="is not a checkpoint of --output_dir"):
        plan_run(PretrainArgs(output_dir=str(out), resume_from="/nonexistent/run/checkpoints/step4"))
    plan_run(PretrainArgs(output_dir=str(out), resume_from=str(out / "checkpoints" / "step4")))
    plan_run(PretrainArgs(output_dir=str(out), resume_from="step4"))
