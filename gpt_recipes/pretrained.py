"""The pretrained model a fine-tuning recipe starts from: its config and tokenizer (with a chat
template), the sequence length, the LoRA plan, and how each rank builds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import PretrainedConfig, PreTrainedModel

from gpt_recipes.args import StartingModelArgs
from gpt_recipes.checkpoints import paths
from gpt_recipes.checkpoints.export import check_output_folder
from gpt_recipes.checkpoints.run_dir import check_output_path
from gpt_recipes.data import sft
from gpt_recipes.data.tokenizer import load_tokenizer
from gpt_recipes.errors import UserError
from gpt_recipes.models.adapters import AdapterPlan, TrainedWeights, plan_adapter
from gpt_recipes.models.causal_lm import (
    check_seq_len,
    check_tokenizer_fits,
    check_weights_fit,
    load_pretrained,
    load_pretrained_config,
)
from gpt_recipes.runner import RunPlan


@dataclass
class StartingModel:
    name_or_path: str
    config: PretrainedConfig
    tokenizer: Any
    seq_len: int
    adapter: AdapterPlan | None

    @property
    def weights(self) -> TrainedWeights:
        """What trains: the adapters, or every weight."""
        return self.adapter if self.adapter is not None else TrainedWeights()

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def builder(self, run: RunPlan, seed: int) -> Callable[[], PreTrainedModel]:
        """Load the weights (under ZeRO-3 each rank only its partition) and add the adapters if asked."""
        def build() -> PreTrainedModel:
            model = load_pretrained(self.name_or_path, self.config, run.ds_cfg)
            return self.adapter.wrap(model, seed) if self.adapter else model

        return build


def load_model_folder(name_or_path: str, flag: str):
    """The config of a Hugging Face model folder to start from, checked against its weights; a
    run or checkpoint folder of these recipes gets the command that exports it."""
    kind = paths.training_folder_kind(name_or_path)
    if kind:
        raise UserError(f"{flag} {name_or_path} is {kind} of these recipes, not a Hugging Face model folder; export "
                        f"it first: python tools/convert_to_hf.py {name_or_path} OUT_DIR, then pass OUT_DIR")
    config = load_pretrained_config(name_or_path)
    check_weights_fit(name_or_path, config)
    return config


def check_starting_model(args: StartingModelArgs, run: RunPlan) -> StartingModel:
    """Check the model folder, its tokenizer, the length and the LoRA flags before any rank starts."""
    name_or_path = args.model_name_or_path
    config = load_model_folder(name_or_path, "--model_name_or_path")
    tokenizer = load_tokenizer(name_or_path)
    check_tokenizer_fits(tokenizer, config, name_or_path)
    if sft.ensure_chat_template(tokenizer):
        run.say("The tokenizer has no chat template: using the default one (saved with checkpoints and exports)")
    seq_len = check_seq_len(config, args.seq_len)
    adapter = plan_adapter(args, config, name_or_path)
    if args.export_adapter:
        if args.export_hf and Path(args.export_adapter).resolve() == Path(args.export_hf).resolve():
            raise UserError("--export_adapter and --export_hf name the same folder; give each its own")
        check_output_path(args.export_adapter, "--export_adapter", {"--model_name_or_path": name_or_path},
                          outputs={"--output_dir": run.out_dir,
                                   **({"--export_hf": args.export_hf} if args.export_hf else {})})
        check_output_folder(Path(args.export_adapter), args.overwrite, force_flag="--overwrite")
    return StartingModel(name_or_path, config, tokenizer, seq_len, adapter)
