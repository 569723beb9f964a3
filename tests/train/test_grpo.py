"""GRPO's parts against hand-computed values: advantages, the clipped loss, masking, the loss as a
mean over the global batch however it is split, reward functions and their checks."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError
from gpt_recipes.train import grpo
from tests.helpers import TINY_GPT2


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    advantages, std = grpo.group_advantages(rewards, 4, scale=False)
    assert advantages.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert std[1] == 0  # a group whose completions all earned the same teaches nothing
    scaled, std = grpo.group_advantages(rewards, 4, scale=True)
    sample_std = (4 * 0.25 / 3) ** 0.5  # the unbiased std of (1, 0, 0, 1)
    assert scaled[0].item() == pytest.approx(0.5 / (sample_std + 1e-4))
    assert scaled[4:].abs().max() == 0


def test_the_clipped_loss_takes_the_pessimistic_side():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old log-probs of 0
    old = torch.zeros(1, 3)
    loss, clipped, kl = grpo.clipped_token_loss(logps, old, torch.tensor([1.0]), epsilon=0.2)
    # A > 0: min(r A, clip(r) A) = (1.2, 0.5, 1.0); the loss is its negative.
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.5, -1.0])
    assert clipped.tolist() == [[1.0, 0.0, 0.0]] and kl is None
    loss, clipped, _ = grpo.clipped_token_loss(logps, old, torch.tensor([-1.0]), epsilon=0.2)
    # A < 0: min(-r, -clip(r)) = (-1.5, -0.8, -1.0).
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8, 1.0])
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]
    # The k3 KL estimate: exp(ref - logp) - (ref - logp) - 1, zero where the policy is the reference.
    ref = torch.log(torch.tensor([[1.0, 0.5, 1.0]]))
    loss_kl, _, kl = grpo.clipped_token_loss(logps, old, torch.tensor([1.0]), 0.2, ref, beta=0.5)
    d = float(np.log(1 / 1.5))
    assert kl.tolist()[0] == pytest.approx([np.exp(d) - d - 1, 0.0, 0.0])
    assert (loss_kl - loss_kl.new_tensor([[-1.2, -0.5, -1.0]])).tolist()[0] == pytest.approx((0.5 * kl).tolist()[0], abs=1e-6)


def test_the_loss_masks_prompts_and_padding_and_normalises_by_the_global_batch():
    token_loss = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # completion tokens up to and including EOS
    # grpo: each completion's token mean (1.5, 4), averaged over the 4 completions of the global batch.
    assert grpo.loss_share(token_loss, mask, "grpo", 4, 3).item() == pytest.approx((1.5 + 4) / 4)
    # dr_grpo: the tokens' sum (7) over completions x max_completion_length.
    assert grpo.loss_share(token_loss, mask, "dr_grpo", 4, 3).item() == pytest.approx(7 / 12)


def _rollout(model_vocab: int, n: int, seed: int = 0) -> grpo.Rollout:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model_vocab, (n, 5), generator=g)
    prompt_mask = torch.ones(n, 5, dtype=torch.long)
    prompt_mask[::2, :2] = 0  # left padding on every other row
    completion = torch.randint(1, model_vocab, (n, 6), generator=g)
    completion_mask = torch.ones(n, 6, dtype=torch.long)
    completion_mask[1::3, 3:] = 0  # ended early
    return grpo.Rollout(prompt, prompt_mask, completion, completion_mask, [""] * n, torch.ones(n, dtype=torch.bool))


def _slice(r: grpo.Rollout, rows: slice) -> grpo.Rollout:
    return grpo.Rollout(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                        r.texts[rows], r.ended[rows])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_two_ranks_with_half_the_prompts_each_give_one_ranks_loss_and_gradients(loss_type):
    """Fixed completions and rewards (2 prompts x G = 4, fp32): one rank's micro-batch of 8 against two
    ranks of 4 each, whose parts DeepSpeed averages after scaling by the data-parallel size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_GPT2, "vocab_size": 97}))
    rollout = _rollout(97, 8)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.4, 1.0, 0.0, 0.5, 0.2], dtype=torch.float64)
    advantages, _ = grpo.group_advantages(rewards, 4, scale=True)

    def part(r: grpo.Rollout, a: torch.Tensor, data_parallel: int) -> torch.Tensor:
        logps, _ = grpo.rollout_logps(model, r, slice(None))
        token_loss, _, _ = grpo.clipped_token_loss(logps, logps.detach(), a.float(), 0.2)
        return grpo.loss_share(token_loss, r.completion_mask.float(), loss_type, 8, 6) * data_parallel

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = part(rollout, advantages, 1)
    one_grads = grads(one)
    halves = [part(_slice(rollout, slice(k * 4, k * 4 + 4)), advantages[k * 4:k * 4 + 4], 2) for k in range(2)]
    two_grads = sum(grads(h) for h in halves) / 2  # DeepSpeed averages the ranks' gradients
    assert abs(sum(h.item() for h in halves) / 2 - one.item()) <= 2e-5
    assert (two_grads - one_grads).abs().max().item() <= 2e-5
    assert one_grads.abs().max().item() > 1e-4  # the advantages do move the model


def test_each_rank_generates_its_consecutive_part_of_the_global_batch():
    step = object.__new__(grpo.GRPOStep)
    step.settings = SimpleNamespace(num_generations=4)
    step.plan = BatchPlan(micro_batch=2, grad_accum=2, world_size=2)
    prompts = np.array([7, 3])  # this step's prompts: 8 completions, 4 per rank
    step.env = SimpleNamespace(rank=0)
    assert step._my_completions(prompts) == [7, 7, 7, 7]
    step.env = SimpleNamespace(rank=1)
    assert step._my_completions(prompts) == [3, 3, 3, 3]


def test_reward_functions_are_checked_before_training(tmp_path):
    good = tmp_path / "rewards.py"
    good.write_text("def short(prompts, completions, **kw):\n    return [float(len(c) < 5) for c in completions]\n"
                    "def two(completions):\n    return [0.0]\n"
                    "def broken(prompts, completions, **kw):\n    return [1.0]\n"
                    "def text(prompts, completions, **kw):\n    return ['good' for _ in completions]\n")
    funcs = grpo.load_reward_funcs([f"{good}:short", "gpt_recipes.data.grpo_rewards:full_sentence"], [2.0, 1.0])
    assert [(f.name, f.weight) for f in funcs] == [("short", 2.0), ("full_sentence", 1.0)]
    table = grpo.score(funcs, ["p", "p"], ["ok.", "Return the name of the file it reads."], {})
    assert table.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert grpo.combine(table, torch.tensor([2.0, 1.0], dtype=torch.float64)).tolist() == [2.0, 1.0]
    for spec, message in ((f"{tmp_path}/none.py:f", "does not exist"), ("no_such_module:f", "could not be imported"),
                          (f"{good}:missing", "has no function 'missing'"), (str(good), "FILE.py:NAME"),
                          (f"{good}:two", "expected the signature (prompts, completions, **kwargs)")):
        with pytest.raises(UserError, match=re.escape(message)):
            grpo.load_reward_funcs([spec], [])
    with pytest.raises(UserError, match="--reward_weights gives 1 weights for 2"):
        grpo.load_reward_funcs([f"{good}:short", f"{good}:broken"], [1.0])
    with pytest.raises(UserError, match="reward function broken returned 1 values for 2 completions"):
        grpo.score(grpo.load_reward_funcs([f"{good}:broken"], []), ["p", "p"], ["a", "b"], {})
    with pytest.raises(UserError, match="reward function text returned 'good' for completion 0"):
        grpo.score(grpo.load_reward_funcs([f"{good}:text"], []), ["p"], ["a"], {})
    none = grpo.score([grpo.RewardFunc("na", lambda prompts, completions, **kw: [None, 1], 1.0)], ["p", "p"],
                      ["a", "b"], {})
    assert grpo.combine(none, torch.ones(1, dtype=torch.float64)).tolist() == [0.0, 1.0]  # None: not applicable


def test_settings_are_checked_before_any_rank_starts():
    plan = BatchPlan(micro_batch=4, grad_accum=1, world_size=2)
    settings = dict(num_generations=4, max_completion_length=8, temperature=1.0, top_p=1.0, beta=0.0, epsilon=0.2,
                    loss_type="grpo", scale_rewards=True)
    grpo.GRPOSettings(**settings).check_batch(plan)
    for change, message in (({"num_generations": 1}, "at least 2"), ({"beta": -0.1}, "--beta must be >= 0"),
                            ({"top_p": 0.0}, "--top_p must lie in \\(0, 1\\]"),
                            ({"loss_type": "ppo"}, "--loss_type must be one of grpo, dr_grpo")):
        with pytest.raises(UserError, match=message):
            grpo.GRPOSettings(**{**settings, **change})
    with pytest.raises(UserError, match="not divisible by --num_generations 3"):
        grpo.GRPOSettings(**{**settings, "num_generations": 3}).check_batch(plan)


def test_prompts_longer_than_the_model_allows_are_refused(tmp_path):
    from gpt_recipes.data.sft import DEFAULT_CHAT_TEMPLATE
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    rows = [("p.jsonl row 1", {"prompt": "short", "answer": "x"}),
            ("p.jsonl row 2", {"prompt": [{"role": "user", "content": "a chat prompt"}]})]
    prompts = grpo.Prompts(rows, tokenizer, max_prompt_tokens=64)
    assert prompts.column_lists([0, 1]) == {"answer": ["x", None]} and prompts.prompts[1][0]["role"] == "user"
    with pytest.raises(UserError, match="p.jsonl row 1: the prompt is .* tokens; .* allows 3"):
        grpo.Prompts(rows, tokenizer, max_prompt_tokens=3)
    with pytest.raises(UserError, match="needs a 'prompt'"):
        grpo.Prompts([("p.jsonl row 3", {"question": "q"})], tokenizer, 64)
    with pytest.raises(UserError, match="p.jsonl row 4: empty prompt"):
        grpo.Prompts([("p.jsonl row 4", {"prompt": "  "})], tokenizer, 64)
    with pytest.raises(UserError, match="p.jsonl row 5: a column named 'completions' would collide"):
        grpo.Prompts([("p.jsonl row 5", {"prompt": "q", "completions": ["x"]})], tokenizer, 64)
    assert json.dumps(prompts.prompts)  # what the reward functions receive stays plain data


def test_reward_functions_run_guarded(tmp_path):
    """An exit or interrupt inside a reward is a failure naming it; each function gets its own copy of the
    inputs; numpy numbers count; a file that exits or parses flags at import is named, not obeyed."""
    rewards = tmp_path / "guarded.py"
    rewards.write_text("import sys, numpy as np\n"
                       "def leave(prompts, completions, **kw):\n    sys.exit(0)\n"
                       "def interrupt(prompts, completions, **kw):\n    raise KeyboardInterrupt\n"
                       "def edit(prompts, completions, **kw):\n    completions[0] = 'changed'\n"
                       "    return [1.0] * len(completions)\n"
                       "def read(prompts, completions, **kw):\n    return [float(c == 'changed') for c in completions]\n"
                       "def numpy_kind(prompts, completions, **kw):\n    return [np.float32(2.0), np.int64(1)]\n")
    load = lambda *names: grpo.load_reward_funcs([f"{rewards}:{n}" for n in names], [])  # noqa: E731
    with pytest.raises(UserError, match=re.escape("reward function leave failed: it called exit (0)")):
        grpo.score(load("leave"), ["p"], ["a"], {})
    with pytest.raises(UserError, match="reward function interrupt failed: it raised KeyboardInterrupt"):
        grpo.score(load("interrupt"), ["p"], ["a"], {})
    assert grpo.score(load("edit", "read"), ["p", "p"], ["a", "b"], {}).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert grpo.score(load("numpy_kind"), ["p", "p"], ["a", "b"], {}).tolist() == [[2.0], [1.0]]
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(UserError, match=re.escape(f"{exits} could not be imported: it called exit (0)")):
        grpo.load_reward_funcs([f"{exits}:f"], [])
    parses = tmp_path / "parses.py"
    parses.write_text("import argparse\nFLAGS = argparse.ArgumentParser().parse_args()\n"
                      "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    assert grpo.load_reward_funcs([f"{parses}:f"], [])[0].name == "f"  # it saw no flags, not the recipe's


def test_a_step_that_cannot_teach_is_said_once():
    said = []
    step = object.__new__(grpo.GRPOStep)
    step.warn, step.warned = said.append, False
    step._warn_if_no_signal(0, torch.tensor([[1.0], [2.0]]), torch.tensor([0.5]))
    assert said == []
    step._warn_if_no_signal(4, torch.tensor([[1.0], [1.0]]), torch.tensor([0.0]))
    step._warn_if_no_signal(5, torch.full((2, 1), float("nan")), torch.tensor([0.0]))
    assert len(said) == 1 and "step 5: within every prompt's group the completions earned the same reward" in said[0]
    fresh = object.__new__(grpo.GRPOStep)
    fresh.warn, fresh.warned = said.append, False
    fresh._warn_if_no_signal(0, torch.full((2, 1), float("nan")), torch.tensor([0.0]))
    assert "every reward function returned None for every completion" in said[-1]
