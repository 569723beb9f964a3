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
    ({"output_dir": "{file}/run"}, "cannot create --output_dir .*/notes.txt/run: .*/notes.txt is a file"),
    ({"export_hf": "{file}/hf"}, "cannot create --export_hf .*/notes.txt/hf: .*/notes.txt is a file"),
    ({"output_dir": "/proc/x/run"}, "cannot write --output_dir /proc/x/run: /proc does not take new files"),
    ({"export_hf": "{out}"}, "--export_hf .*/out is also --output_dir, an input"),
    ({"export_hf": "{out}/hf"}, "--export_hf .*/out/hf is inside --output_dir .*/out, an input"),
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
