"""LoRA glue, in one process: target modules, flags, the base fingerprint, resume checks, frozen digests."""

import dataclasses
import json

import pytest
import torch

from gpt_recipes.args import FinetuneArgs
from gpt_recipes.errors import UserError
from gpt_recipes.models import adapters
from gpt_recipes.models.causal_lm import build_config, build_model
from tests.helpers import TINY_GPT2, TINY_LLAMA


def config_of(tmp_path_factory, raw: dict):
    path = tmp_path_factory.mktemp("model") / "model.json"
    path.write_text(json.dumps(raw))
    return build_config(str(path), vocab_size=512, eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2_config(tmp_path_factory):
    return config_of(tmp_path_factory, TINY_GPT2)


@pytest.fixture(scope="module")
def llama_config(tmp_path_factory):
    return config_of(tmp_path_factory, TINY_LLAMA)


@pytest.fixture
def base_folder(tmp_path, gpt2_config):
    torch.manual_seed(0)
    build_model(gpt2_config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_args(**flags) -> FinetuneArgs:
    return dataclasses.replace(FinetuneArgs(), use_peft=True, **flags)


def test_target_names_split_at_commas_and_all_linear_stands_alone():
    assert adapters.requested_targets(None) == adapters.ALL_LINEAR
    assert adapters.requested_targets(["q_proj,v_proj", "o_proj"]) == ["q_proj", "v_proj", "o_proj"]
    with pytest.raises(UserError, match="stands alone"):
        adapters.requested_targets(["all-linear", "q_proj"])


@pytest.mark.parametrize("family, expected", [
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
    ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_default_targets_are_every_block_projection_but_not_the_output_layer(gpt2_config, llama_config, base_folder,
                                                                             family, expected):
    config = gpt2_config if family == "gpt2" else llama_config
    plan = adapters.plan_adapter(lora_args(), config, str(base_folder))
    assert plan.targets == expected


def test_unknown_target_names_the_modules_that_exist(gpt2_config, base_folder):
    with pytest.raises(UserError) as err:
        adapters.plan_adapter(lora_args(lora_target_modules=["c_attn,q_proj"]), gpt2_config, str(base_folder))
    message = str(err.value)
    assert "--lora_target_modules q_proj" in message and "has no module of that name" in message
    assert "c_attn, c_fc, c_proj" in message and "output layer: lm_head" in message


def test_a_module_lora_cannot_adapt_is_refused_with_its_type(gpt2_config, base_folder):
    with pytest.raises(UserError, match="ln_1 is a LayerNorm, which LoRA cannot adapt"):
        adapters.plan_adapter(lora_args(lora_target_modules=["ln_1"]), gpt2_config, str(base_folder))


def test_lora_flags_without_use_peft_are_refused(gpt2_config, base_folder):
    args = dataclasses.replace(FinetuneArgs(), lora_target_modules=["c_attn"], export_adapter="out")
    with pytest.raises(UserError, match="--lora_target_modules, --export_adapter needs --use_peft"):
        adapters.plan_adapter(args, gpt2_config, str(base_folder))
    assert adapters.plan_adapter(FinetuneArgs(), gpt2_config, str(base_folder)) is None


@pytest.mark.parametrize("flags, message", [({"lora_r": 0}, "--lora_r"), ({"lora_alpha": 0}, "--lora_alpha"),
                                            ({"lora_dropout": 1.0}, "--lora_dropout"),
                                            ({"lora_modules_to_save": ["head"]}, "--lora_modules_to_save head")])
def test_bad_lora_values(gpt2_config, base_folder, flags, message):
    with pytest.raises(UserError, match=message):
        adapters.plan_adapter(lora_args(**flags), gpt2_config, str(base_folder))


def test_adapters_start_at_zero_so_the_wrapped_model_computes_the_base(gpt2_config, base_folder):
    from transformers import AutoModelForCausalLM

    plan = adapters.plan_adapter(lora_args(lora_dropout=0.0), gpt2_config, str(base_folder))
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        wrapped = plan.wrap(AutoModelForCausalLM.from_pretrained(base_folder), seed=1).eval()
        assert torch.equal(wrapped(input_ids=ids).logits, expected)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The adapters' initial weights depend on the seed alone.
    again = plan.wrap(AutoModelForCausalLM.from_pretrained(base_folder), seed=1)
    first = dict(wrapped.named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in again.named_parameters() if "lora_A" in n)


def test_fingerprint_follows_the_weights_not_the_folder(tmp_path, base_folder):
    import shutil

    fingerprint = adapters.weights_fingerprint(str(base_folder))
    copy = tmp_path / "copy"
    shutil.copytree(base_folder, copy)
    assert adapters.weights_fingerprint(str(copy)) == fingerprint
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert adapters.weights_fingerprint(str(copy)) != fingerprint
    with pytest.raises(UserError, match="holds no weight files"):
        adapters.weights_fingerprint(str(tmp_path))
    with pytest.raises(UserError, match="does not exist or is not a folder"):  # e.g. --base_model with a typo
        adapters.weights_fingerprint(str(tmp_path / "moved"))


def test_resume_checks_kind_base_and_settings(tmp_path, gpt2_config, base_folder):
    import shutil

    plan = adapters.plan_adapter(lora_args(), gpt2_config, str(base_folder))
    saved = plan.record()
    where = tmp_path / "step5"
    assert adapters.check_resume(saved, plan, where) is None
    assert adapters.check_resume(None, None, where) is None
    with pytest.raises(UserError, match="resume it without --use_peft"):
        adapters.check_resume(None, plan, where)
    with pytest.raises(UserError, match="resume it with --use_peft"):
        adapters.check_resume(saved, None, where)
    with pytest.raises(UserError, match="holds other weights"):
        adapters.check_resume({**saved, "base_fingerprint": "sha256:0"}, plan, where)
    with pytest.raises(UserError, match="--lora_r 8 -> 16"):
        adapters.check_resume({**saved, "r": 8}, plan, where)
    moved = tmp_path / "moved"
    shutil.copytree(base_folder, moved)
    note = adapters.check_resume(saved, adapters.plan_adapter(lora_args(), gpt2_config, str(moved)), where)
    assert note and "same weights" in note


def test_frozen_digest_sees_any_change_to_the_base(gpt2_config, base_folder):
    from transformers import AutoModelForCausalLM

    plan = adapters.plan_adapter(lora_args(), gpt2_config, str(base_folder))
    model = plan.wrap(AutoModelForCausalLM.from_pretrained(base_folder), seed=0)
    before = adapters.frozen_digest(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)  # adapters may change
        assert adapters.frozen_digest(model) == before
        next(p for p in model.parameters() if not p.requires_grad).view(-1)[0] += 1e-3
    assert adapters.frozen_digest(model) != before


def test_modules_to_save_train_in_the_dtype_of_the_adapters_on_a_bf16_base(gpt2_config):
    """peft makes LoRA weights fp32 and copies modules_to_save in the base's bf16; ZeRO-3 flattens what
    trains into one buffer (it asserted on the mix) and the copied head computes with bf16 inputs."""
    from peft import LoraConfig

    base = build_model(gpt2_config).to(torch.bfloat16)
    model = adapters.add_adapters(base, LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    only_lora = adapters.add_adapters(build_model(gpt2_config).to(torch.bfloat16), LoraConfig(r=4, target_modules=["c_attn"]))
    assert {p.dtype for p in only_lora.parameters() if p.requires_grad} == {torch.float32}  # peft's own choice, kept
