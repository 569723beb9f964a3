from dataclasses import dataclass

import pytest

from gpt_recipes import args as recipe_args
from gpt_recipes.args import PretrainArgs, build_parser, parse_args
from tests.helpers import parser_of, scripts


@dataclass
class ToolArgs:
    inputs: list[str] = recipe_args.flag([], "input files", positional=True, metavar="INPUT")
    output: str = recipe_args.flag("out", "output folder")


def test_defaults_run_the_quickstart():
    args = parse_args(PretrainArgs, [])
    assert args.deepspeed_config is None and args.data == ["data/stdlib"]
    assert args.seq_len is None and args.resume is False


def test_flags_are_typed():
    args = parse_args(PretrainArgs, ["--max_steps", "7", "--seq_len", "64", "--resume", "--local_rank=1"])
    assert (args.max_steps, args.seq_len, args.resume, args.local_rank) == (7, 64, True, 1)


def test_positional_inputs():
    args = parse_args(ToolArgs, ["a.txt", "b/", "--output", "d"])
    assert args.inputs == ["a.txt", "b/"] and args.output == "d"
    assert parse_args(ToolArgs, []).inputs == []


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser(PretrainArgs).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--deepspeed_config", "--data", "--model", "--output_dir", "--max_steps", "--seq_len", "--seed",
                 "--log_interval", "--eval_interval", "--save_interval", "--resume"):
        assert flag in text
    assert "--local_rank" not in text  # launcher plumbing, not a user flag


def _float_flags(parser):
    return [a for a in parser._actions if a.option_strings and "float" in (getattr(a.type, "__name__", ""),
                                                                        getattr(getattr(a, "item_type", None), "__name__", ""))]


@pytest.mark.parametrize("script", scripts())
def test_no_float_flag_of_any_script_takes_a_number_that_is_not_one(script, capsys):
    """nan and inf pass every comparison a range check makes (nan > 0 is False, but so is nan <= 0):
    each float flag of every recipe and tool refuses them while parsing, in one line."""
    parser = parser_of(script)
    for action in _float_flags(parser):
        for text in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as stop:
                parser.parse_args([f"{action.option_strings[0]}={text}"])
            assert stop.value.code == 2
            assert f"'{text}' is not a finite number" in capsys.readouterr().err


def test_float_flags_exist_to_be_checked():
    found = {script: len(_float_flags(parser_of(script))) for script in scripts()}
    assert found["tools/generate.py"] >= 3 and found["recipes/dpo.py"] >= 1 and found["benchmarks/benchmark.py"] >= 1


def test_list_flags_take_commas_or_spaces_and_old_spellings_still_work():
    from gpt_recipes.args import FinetuneArgs

    args = parse_args(PretrainArgs, ["--data", "a,b", "c", "--data_weights", "3,1", "0.5", "--eval_tasks", "x,y",
                                     "--ds", "optimizer.params.betas=[0.9,0.99]", "gradient_clipping=0.5"])
    assert args.data == ["a", "b", "c"] and args.data_weights == [3.0, 1.0, 0.5] and args.eval_tasks == ["x", "y"]
    assert args.ds == ["optimizer.params.betas=[0.9,0.99]", "gradient_clipping=0.5"]  # JSON values keep their commas
    assert parse_args(FinetuneArgs, ["--lora_target_modules", "c_attn,c_fc"]).lora_target_modules == ["c_attn", "c_fc"]
    convert = parser_of("tools/convert_to_hf.py")
    assert convert.parse_args(["run", "out", "--force"]).overwrite is True  # the old name of --overwrite
    assert parser_of("tools/prepare_data.py").parse_args(["--output", "d"]).output_dir == "d"
    assert parser_of("tools/evaluate.py").parse_args(["m", "--output", "f.json"]).output_file == "f.json"
