"""DPO pieces in one process: the loss against a hand computation, pair rows, batches, length policy."""

import math
import re

import numpy as np
import pytest
import torch

from gpt_recipes.data.sft import Example
from gpt_recipes.errors import UserError
from gpt_recipes.train import preference


def test_loss_and_rewards_match_a_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    beta = 0.5
    loss, chosen, rejected = preference.dpo_loss(pc, pr, rc, rr, beta)
    # Pair 1: chosen rose by 1, rejected fell by 1: margin beta * 2 = 1.0. Pair 2: rejected rose by 1.
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    expected = [-math.log(1 / (1 + math.exp(-1.0))), -math.log(1 / (1 + math.exp(0.5)))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    same = preference.dpo_loss(pc, pr, pc, pr, beta)[0]
    assert same.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)


def test_the_other_losses_match_their_definitions():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    h = torch.tensor([2.0, -1.0])  # (pc - rc) - (pr - rr)
    hinge = preference.dpo_loss(pc, pr, rc, rr, 0.5, "hinge")[0]
    assert hinge.tolist() == pytest.approx([0.0, 1.5])  # max(0, 1 - 0.5 h)
    ipo = preference.dpo_loss(pc, pr, rc, rr, 0.5, "ipo")[0]
    assert ipo.tolist() == pytest.approx(((h - 1.0) ** 2).tolist())  # (h - 1 / (2 beta))^2
    smoothed = preference.dpo_loss(pc, pr, rc, rr, 0.5, "sigmoid", label_smoothing=0.1)[0]
    expected = [-0.9 * math.log(1 / (1 + math.exp(-x))) - 0.1 * math.log(1 / (1 + math.exp(x))) for x in (1.0, -0.5)]
    assert smoothed.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(beta=0.0), "--beta must be positive"),
    (dict(beta=0.1, loss_type="kto"), "--loss_type must be one of sigmoid, ipo, hinge, got 'kto'"),
    (dict(beta=0.1, label_smoothing=0.5), "--label_smoothing must lie in \\[0, 0.5\\)"),
    (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "applies to the sigmoid loss"),
    (dict(beta=0.1, rpo_alpha=-1.0), "--rpo_alpha must be 0 or positive"),
])
def test_bad_preference_settings(settings, message):
    with pytest.raises(UserError, match=message):
        preference.DPOSettings(**settings)


def test_the_objective_sums_pairs_and_reports_reward_means():
    loss_fn = preference.DPOLoss(preference.DPOSettings(beta=1.0))
    # Two pairs, two tokens each, vocabulary 3; the model "forward" returns fixed logits.
    logits = torch.log_softmax(torch.tensor([[[2.0, 0.0, 0.0]] * 2, [[0.0, 2.0, 0.0]] * 2,
                                             [[0.0, 0.0, 2.0]] * 2, [[0.0, 2.0, 0.0]] * 2]), dim=-1)
    targets = torch.tensor([[0, 0], [1, -100], [0, 0], [1, -100]])  # chosen 1, chosen 2, rejected 1, rejected 2
    forward = lambda **inputs: type("Out", (), {"logits": logits})  # noqa: E731
    logps = preference.sequence_logps(forward, {}, targets)
    assert logps[1] == pytest.approx(logits[1, 0, 1].item()) and logps[3] == pytest.approx(logits[3, 0, 1].item())
    reference = torch.zeros(4)
    total = loss_fn(forward, {"reference_logps": reference}, targets, reduction="sum")
    per_pair = preference.dpo_loss(logps[:2], logps[2:], reference[:2], reference[2:], 1.0)[0]
    assert total.item() == pytest.approx(per_pair.sum().item())
    metrics = loss_fn.take_metrics("val_")
    assert metrics["val_reward_margin"] == pytest.approx((logps[:2] - logps[2:]).mean().item())
    assert metrics["val_reward_accuracy"] == 0.5  # pair 1 prefers chosen, pair 2 ties (not counted)
    assert metrics["val_logps_chosen"] == pytest.approx(logps[:2].mean().item())
    # the held-out response loss: the chosen answers' NLL per token, over their 3 tokens
    assert metrics["val_nll_chosen"] == pytest.approx(-logps[:2].sum().item() / 3)
    assert loss_fn.take_metrics() == {}

    # RPO: the chosen answers' NLL per token, per pair, times rpo_alpha, is added to the loss
    rpo = preference.DPOLoss(preference.DPOSettings(beta=1.0, rpo_alpha=2.0))
    with_nll = rpo(forward, {"reference_logps": reference}, targets, reduction="sum")
    assert with_nll.item() == pytest.approx(total.item() + 2.0 * (-logps[0] / 2 - logps[1] / 1).item())


def test_a_falling_likelihood_is_warned_once():
    said = []
    loss_fn = preference.DPOLoss(preference.DPOSettings(beta=0.1), warn=said.append)
    for nll in (5.4, 5.6, 6.2, 8.4):  # the held-out response loss at four evaluations
        loss_fn.for_evaluation()._watch_likelihood(nll)
    assert len(said) == 1 and "rose from 5.40 to 6.20 nats per token" in said[0] and "--rpo_alpha" in said[0]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "missing rejected"),
    ({"chosen": "a", "rejected": "b"}, "missing prompt (or messages)"),
    ({"prompt": "q", "chosen": "same ", "rejected": "same"}, "are the same answer"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty 'chosen' answer"),
    ({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "must be an assistant message"),
    ({"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "has role 'robot'"),
])
def test_bad_pairs_name_the_row(row, message):
    with pytest.raises(UserError, match=re.escape(message)):
        preference.to_pair_messages(row, "pairs.jsonl row 3")


def test_chat_pairs_score_the_final_answer_only(tmp_path):
    from gpt_recipes.data.sft import ensure_chat_template
    from gpt_recipes.data.tokenizer import train_bpe

    tokenizer = train_bpe(["hello there, how are you? earlier answer, and now? fine thanks. " * 50], vocab_size=300)
    ensure_chat_template(tokenizer)
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier answer"},
                        {"role": "user", "content": "and now?"}],
           "chosen": [{"role": "assistant", "content": "fine"}], "rejected": "thanks"}
    pair = preference.encode_pair(tokenizer, row, "row 1")
    text = tokenizer.decode(pair.chosen.ids[pair.chosen.is_response])
    assert text.startswith("fine") and "earlier" not in text
    assert tokenizer.decode(pair.rejected.ids[pair.rejected.is_response]).startswith("thanks")


def example(n: int, answer: int) -> Example:
    is_response = np.zeros(n, dtype=bool)
    is_response[n - answer:] = True
    return Example(np.arange(n, dtype=np.int64) + 1, is_response)


def test_a_pair_goes_when_either_side_is_too_long():
    pairs = [preference.Pair(example(5, 2), example(9, 2)), preference.Pair(example(5, 2), example(6, 2))]
    kept, report = preference.fit_length(pairs, max_tokens=8, truncate=False)
    assert len(kept) == 1 and report.dropped == 1
    kept, report = preference.fit_length(pairs, max_tokens=8, truncate=True)  # 9 -> 8 keeps an answer token
    assert len(kept) == 2 and report.truncated == 1 and len(kept[0].rejected.ids) == 8


def test_a_batch_is_chosen_rows_then_rejected_rows_with_their_reference():
    pairs = [preference.Pair(example(4 + i, 2), example(6 + i, 3)) for i in range(3)]
    samples = preference.PreferenceSamples(pairs, pad_id=0)
    samples.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], dtype=torch.float64)
    inputs, targets = samples.batch(np.array([2, 0]))
    assert inputs["input_ids"].shape[0] == 4
    assert inputs["reference_logps"].tolist() == [-5.0, -1.0, -6.0, -2.0]
    assert (targets != -100).sum(dim=1).tolist() == [2, 2, 3, 3]
    assert samples.num_targets(np.array([2, 0])) == 2
    assert samples.fingerprint() != preference.PreferenceSamples(pairs[:2], pad_id=0).fingerprint()
