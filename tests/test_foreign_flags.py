"""Flags users bring from the Trainer, TRL and nanoGPT get this project's way in one line."""

import re

import pytest

from gpt_recipes.args import FinetuneArgs, PretrainArgs, build_parser
from gpt_recipes.foreign_flags import POINTERS, explain_unknown
from gpt_recipes.train.grpo import GRPOArgs
from gpt_recipes.train.kto import KTOArgs
from gpt_recipes.train.preference import DPOArgs

RECIPES = (PretrainArgs, FinetuneArgs, DPOArgs, KTOArgs, GRPOArgs)


def _flags(spec) -> list[str]:
    return [s for action in build_parser(spec)._actions for s in action.option_strings]


def test_every_pointer_names_flags_a_recipe_has_and_shows_somewhere():
    own = [set(_flags(spec)) for spec in RECIPES]
    every = set.union(*own)
    for name, (way, needs) in POINTERS.items():
        assert not all(f"--{name}" in flags for flags in own), f"--{name} is every recipe's flag: its pointer never shows"
        named = set(re.findall(r"--[a-z_]+", way)) | {f"--{n}" for n in needs}
        assert named <= every, (name, named - every)


@pytest.mark.parametrize("argv, line", [
    (["--learning_rate", "1e-4"], "unrecognized argument --learning_rate; here: the learning rate is the DeepSpeed "
                                  "JSON's: --ds optimizer.params.lr=VALUE"),
    (["--gradient-checkpointing"], "unrecognized argument --gradient_checkpointing; here: --activation_checkpointing"),
    (["--report_to", "wandb"], "here: metrics go to OUTPUT_DIR/metrics.jsonl; for Weights & Biases (offline)"),
    (["--per_device_train_batch_size=4"], "here: batch sizes are the DeepSpeed JSON's: --ds "
                                          "train_micro_batch_size_per_gpu=N"),
    (["--max_iters", "5"], "here: --max_steps"),
    (["--lerning_rate", "3"], "unrecognized argument --lerning_rate (--learning_rate?); here: the learning rate"),
    (["--save_intervl", "3"], "unrecognized argument --save_intervl; did you mean --save_interval?"),
    (["--nothing_like_it"], "unrecognized argument --nothing_like_it; see --help"),
])
def test_a_recipe_answers_a_foreign_flag_in_one_line(capsys, argv, line):
    with pytest.raises(SystemExit) as stop:
        build_parser(PretrainArgs).parse_args(argv)
    assert stop.value.code == 2
    assert line in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_tool_without_the_flags_a_pointer_names_gets_no_pointer():
    assert explain_unknown("--learning_rate", ["--help", "--max_new_tokens"]) == \
        "unrecognized argument --learning_rate; see --help"
