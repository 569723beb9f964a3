"""KTO's pieces in one process: the loss against its definition, rows and their checks, the mismatched
pairs of the KL estimate, batches, the figures it reports, and the loss and gradients of a global
batch split into parts equal to those of the whole."""

import math
import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gpt_recipes.errors import UserError
from gpt_recipes.train import kto


def test_the_loss_matches_its_definition():
    logratio = torch.tensor([0.5, -1.0, 2.0, 0.0])
    desirable = torch.tensor([True, True, False, False])
    kl = torch.tensor(0.3)
    loss = kto.kto_loss(logratio, kl, desirable, beta=0.5, desirable_weight=2.0, undesirable_weight=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [2.0 * (1 - sig(0.5 * (0.5 - 0.3))), 2.0 * (1 - sig(0.5 * (-1.0 - 0.3))),
                1.5 * (1 - sig(0.5 * (0.3 - 2.0))), 1.5 * (1 - sig(0.5 * (0.3 - 0.0)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-7)
    # At the start the policy is the reference: every row's loss is its weight / 2.
    assert kto.kto_loss(torch.zeros(2), torch.tensor(0.0), torch.tensor([True, False]), 0.1).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "completion": "a"}, "a KTO row needs 'prompt', 'completion' and 'label' (missing label)"),
    ({"prompt": "q", "label": True}, "(missing completion)"),
    ({"prompt": "q", "completion": "a", "label": "true"}, "'label' must be true (a desirable completion) or false "
                                                        "(an undesirable one), not 'true'"),
    ({"prompt": "q", "completion": "a", "label": 1}, "'label' must be true"),
    ({"prompt": " ", "completion": "a", "label": True}, "empty prompt"),
    ({"prompt": "q", "completion": {"role": "user", "content": "a"}, "label": True}, "must be an assistant message"),
])
def test_bad_rows_name_the_row(row, message):
    with pytest.raises(UserError, match=re.escape(message)):
        kto.read_row(row, "rows.jsonl row 3")


def test_both_kinds_of_row_are_needed():
    rows = [kto.read_row({"prompt": "q", "completion": c, "label": True}, "r") for c in ("a", "b")]
    with pytest.raises(UserError, match=re.escape("rows.jsonl: every row is desirable (label true); KTO needs rows "
                                                  "of both kinds")):
        kto.check_classes(rows, "rows.jsonl")
    rows.append(kto.read_row({"prompt": [{"role": "user", "content": "q"}], "completion": [
        {"role": "assistant", "content": "c"}], "label": False}, "r"))
    assert kto.check_classes(rows, "rows.jsonl") == (2, 1)


@pytest.fixture(scope="module")
def tokenizer():
    from gpt_recipes.data.sft import ensure_chat_template
    from gpt_recipes.data.tokenizer import train_bpe

    tok = train_bpe(["what is one? what is two? one two three four five six. " * 50], vocab_size=300)
    ensure_chat_template(tok)
    return tok


def test_the_kl_estimate_pairs_each_prompt_with_the_next_rows_completion(tokenizer):
    rows = kto.encode_rows(tokenizer, [(f"r{i}", {"prompt": p, "completion": c, "label": i % 2 == 0}) for i, (p, c)
                                       in enumerate([("what is one?", "one two"), ("what is two?", "three four"),
                                                     ("what is one?", "five six")])], 64, False, lambda _: None)
    mismatched = kto.mismatched(tokenizer, rows, 64, "rows")
    answer = lambda ex: tokenizer.decode(ex.ids[ex.is_response], skip_special_tokens=True).strip()  # noqa: E731
    assert [answer(ex) for ex in mismatched] == ["three four", "five six", "one two"]
    samples = kto.KTOSamples(rows, mismatched, pad_id=0)
    samples.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], dtype=torch.float64)
    inputs, targets = samples.batch(np.array([2, 0]))
    assert inputs["input_ids"].shape[0] == 4 and inputs["desirable"].tolist() == [True, True]
    assert inputs["reference_logps"].tolist() == [-5.0, -1.0, -6.0, -2.0]  # the rows' first, then the mismatched
    assert samples.num_targets(np.array([2, 0])) == 2


def _model():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=50,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoModelForCausalLM.from_config(config)


def _batch(n: int, width: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2 * n, width), generator=g)
    targets = torch.where(torch.arange(width) >= width // 2, torch.roll(ids, -1, 1), -100)
    reference = torch.randn(2 * n, generator=g) * 2 - 20
    return {"input_ids": ids, "reference_logps": reference, "desirable": torch.arange(n) % 3 != 0}, targets


def _part(inputs, targets, rows: slice, n: int):
    """Rows `rows` of a KTOSamples-shaped batch of n rows (its first half) with their mismatched halves."""
    index = torch.cat([torch.arange(n)[rows], n + torch.arange(n)[rows]])
    return {"input_ids": inputs["input_ids"][index], "reference_logps": inputs["reference_logps"][index],
            "desirable": inputs["desirable"][rows]}, targets[index]


def test_a_global_batch_split_over_ranks_gives_the_whole_batchs_loss_and_gradients():
    """2 ranks x 3 rows against 1 rank x 6 rows, fp32: the loss is a mean over the global batch's rows
    at one reference point, and DeepSpeed averages the ranks' gradients, as simulated here."""
    model = _model()
    settings = kto.KTOSettings(beta=0.5, desirable_weight=1.0, undesirable_weight=1.33)
    inputs, targets = _batch(6)

    def grads(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = kto.KTOLoss(settings)
    whole.kl = torch.tensor(0.7)
    one = whole(model, inputs, targets, reduction="sum") / 6
    one_grads = grads(one)
    parts = []
    for rows in (slice(0, 3), slice(3, 6)):
        loss_fn = kto.KTOLoss(settings)
        loss_fn.kl = torch.tensor(0.7)
        parts.append(loss_fn(model, *_part(inputs, targets, rows, 6), reduction="sum") / 6 * 2)  # DeepSpeed's x 1/2
    two_grads = sum(grads(p) for p in parts) / 2
    assert abs(sum(p.item() for p in parts) / 2 - one.item()) <= 2e-5
    assert (two_grads - one_grads).abs().max().item() <= 2e-5
    assert one_grads.abs().max().item() > 1e-4


def test_the_reported_figures_are_means_over_each_kind_of_row():
    model = _model()
    inputs, targets = _batch(6)
    loss_fn = kto.KTOLoss(kto.KTOSettings(beta=0.5))
    loss_fn.set_reference_point(torch.tensor(0.2))
    loss_fn(model, inputs, targets, reduction="sum")
    loss_fn.set_reference_point(torch.tensor(0.4))
    figures = loss_fn.take_metrics("val_")
    with torch.no_grad():
        from gpt_recipes.train.preference import sequence_logps

        logps = sequence_logps(model, {"input_ids": inputs["input_ids"][:6]}, targets[:6])
    rewards = 0.5 * (logps - inputs["reference_logps"][:6])
    d = inputs["desirable"]
    assert figures["val_rewards/chosen"] == pytest.approx(rewards[d].mean().item(), abs=1e-5)
    assert figures["val_rewards/rejected"] == pytest.approx(rewards[~d].mean().item(), abs=1e-5)
    assert figures["val_rewards/margins"] == pytest.approx(rewards[d].mean().item() - rewards[~d].mean().item(),
                                                           abs=1e-5)
    assert figures["val_logps/chosen"] == pytest.approx(logps[d].mean().item(), abs=1e-4)
    tokens = (targets[:6] != -100).sum(1).float()
    assert figures["val_nll_chosen"] == pytest.approx((-logps[d].sum() / tokens[d].sum()).item(), abs=1e-5)
    assert figures["val_kl"] == pytest.approx(0.3)  # the mean of the two estimates
    assert loss_fn.take_metrics() == {}


def test_the_weights_note_follows_the_papers_advice():
    settings = kto.KTOSettings()
    assert kto.weights_note(settings, 100, 100) is None
    assert "recommends 1 to 4/3" in kto.weights_note(settings, 100, 300)
    assert kto.weights_note(kto.KTOSettings(desirable_weight=3.0), 100, 300) is None
    with pytest.raises(UserError, match="--undesirable_weight must be positive"):
        kto.KTOSettings(undesirable_weight=0.0)
