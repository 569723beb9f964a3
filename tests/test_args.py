from dataclasses import dataclass

import pytest

from gpt_recipes import args as recipe_args
from gpt_recipes.args import PretrainArgs, build_parser, parse_args


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
