"""Preference tuning with DPO (Rafailov et al., 2023): pairs, their batches, the losses, reference log-probs.

A pair is a prompt with a chosen and a rejected answer, rendered with the same chat template
and masking as fine-tuning: only the final answer's tokens are scored. With
h = (pi_c - ref_c) - (pi_r - ref_r), where pi and ref are the log-probabilities of the answer's
tokens under the policy and the reference (the starting model), the losses take TRL's names:

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO; eps: --label_smoothing)
    hinge    max(0, 1 - beta h)                                          (SLiC)
    ipo      (h - 1 / (2 beta))^2, with per-token mean log-probabilities (IPO, Azar et al., 2023)

With rpo_alpha, the chosen answer's negative log-likelihood per token is added, times rpo_alpha
(RPO, Pang et al., 2024): DPO alone can lower the chosen answers' likelihood while the margin
grows, and this term holds it up. The reference is never held as a second model: its
log-probabilities are computed once, by the starting model before the first step, and stored
with the run, keyed to the data and the model (train/reference.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gpt_recipes.args import POSITIVE, Flags, StartingModelArgs, at_least, flag, within
from gpt_recipes.data import sft
from gpt_recipes.data.samples import Samples
from gpt_recipes.data.sft import IGNORE, Example
from gpt_recipes.errors import UserError
from gpt_recipes.metrics.device_sums import DeviceSums
from gpt_recipes.parallel.layout import Supports
from gpt_recipes.train.objective import Objective, StepSetup
from gpt_recipes.train.step import DataParallelStep

# Summed per pair, reduced at each log line (and evaluation) and divided by the pairs seen: the
# rewards, and the answers' summed log-probabilities (TRL's logps/chosen, logps/rejected).
STATS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_accuracy", "logps_chosen",
         "logps_rejected")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# How far the held-out chosen answers' loss may rise above its start (nats per token) before the
# run warns that the policy is unlearning what it prefers.
LIKELIHOOD_DROP_WARN = 0.5


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def answer_text(value: Any, key: str, where: str) -> str:
    """An answer (`key`) given as text, an assistant message, or a list holding one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise UserError(f"{where}: '{key}' must be an assistant message with text content")
        value = value["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be text or an assistant message")
    if not value.strip():
        raise UserError(f"{where}: empty '{key}' answer")
    return value


def prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A prompt as chat messages: a text prompt is one user turn; a conversation so far stays as it is
    (its answer is the next assistant turn)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    return sft.to_messages({"messages": [*prompt, {"role": "assistant", "content": "-"}]}, where)[:-1]


def to_pair_messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a row: {"prompt", "chosen", "rejected"}
    with a text prompt, or the prompt as chat "messages" (or a message list under "prompt")."""
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    prompt = row.get("messages") if row.get("messages") is not None else row.get("prompt")
    if prompt is None:
        missing.insert(0, "prompt (or messages)")
    if missing:
        raise UserError(f"{where}: a preference pair needs 'prompt' (or 'messages'), 'chosen' and 'rejected' "
                        f"(missing {', '.join(missing)})")
    messages = prompt_messages(prompt, where)
    chosen, rejected = answer_text(row["chosen"], "chosen", where), answer_text(row["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer, so there is no preference to learn")
    return messages, chosen, rejected


def encode_pair(tokenizer, row: dict[str, Any], where: str) -> Pair:
    messages, chosen, rejected = to_pair_messages(row, where)
    side = lambda answer: sft.encode(tokenizer, [*messages, {"role": "assistant", "content": answer}], where,  # noqa: E731
                                     last_turn_only=True)
    return Pair(side(chosen), side(rejected))


def fit_length(pairs: list[Pair], max_tokens: int, truncate: bool) -> tuple[list[Pair], sft.LengthReport]:
    """Fine-tuning's length policy, per pair: a pair goes when either side would be dropped."""
    kept, dropped, truncated = [], 0, 0
    for pair in pairs:
        sides, report = sft.fit_length([pair.chosen, pair.rejected], max_tokens, truncate)
        if report.dropped:
            dropped += 1
            continue
        truncated += report.truncated > 0
        kept.append(Pair(*sides))
    return kept, sft.LengthReport(len(pairs), dropped, truncated)


class PreferenceSamples(Samples):
    """Pairs for the training loop: a batch of n pairs is 2n rows, the chosen answers then the
    rejected ones, padded to one width, with each pair's reference log-probabilities."""

    def __init__(self, pairs: list[Pair], pad_id: int, pad_multiple: int = 1, max_width: int | None = None):
        self.pairs = pairs
        self.rows = sft.SFTSamples([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id, packed=False,
                                   pad_multiple=pad_multiple, max_width=max_width)
        self.reference: torch.Tensor | None = None  # (pairs, 2): chosen, rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def _both(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        return np.concatenate([indices, indices + len(self.pairs)])

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, targets = self.rows.batch(self._both(indices))
        if self.reference is not None:
            inputs["reference_logps"] = self.reference[np.asarray(indices)].T.reshape(-1)
        return inputs, targets

    def num_tokens(self, indices: np.ndarray) -> int:
        return self.rows.num_tokens(self._both(indices))

    def num_targets(self, indices: np.ndarray) -> int:
        return len(indices)  # the loss is a mean over pairs

    def fingerprint(self) -> str:
        """sha256 of every pair's tokens and scored positions, in order."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for ex in (pair.chosen, pair.rejected):
                digest.update(ex.ids.astype(np.int64).tobytes() + ex.is_response.tobytes() + b"|")
        return digest.hexdigest()


def sequence_logps(forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (fp32) of each row's target tokens."""
    logits = forward(**inputs).logits
    per_token = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                 reduction="none")
    return per_token.view(targets.shape).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); a reward is beta * (pi - ref). For "ipo" the
    log-probabilities given are per-token means, as IPO defines them."""
    reward_chosen = beta * (policy_chosen - reference_chosen)
    reward_rejected = beta * (policy_rejected - reference_rejected)
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    return loss, reward_chosen, reward_rejected


@dataclass
class DPOSettings(Flags):
    """DPO's own flags, by TRL's names."""

    beta: float = flag(0.1, "DPO's beta: how far the policy may move from the reference (higher: less)", POSITIVE)
    loss_type: str = flag("sigmoid", "the preference loss, by TRL's names: sigmoid (DPO), hinge (SLiC), ipo (IPO)",
                          choices=LOSS_TYPES)
    label_smoothing: float = flag(0.0, "with the sigmoid loss: the assumed share of pairs whose preference is wrong "
                                  "(conservative DPO)", within(0, 0.5, high_in=False))
    rpo_alpha: Optional[float] = flag(None, "add this times the chosen answers' NLL per token to the loss (TRL's "
                                      "rpo_alpha): keeps their likelihood up while the preference margin grows",
                                      at_least(0, "must be 0 or positive"))

    def check(self) -> None:
        super().check()
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise UserError(f"--label_smoothing applies to the sigmoid loss (conservative DPO), not --loss_type "
                            f"{self.loss_type}")

    def describe(self) -> str:
        form = {"sigmoid": "DPO (sigmoid)", "hinge": "SLiC (hinge)", "ipo": "IPO"}[self.loss_type]
        return (f"Loss: {form}, beta {self.beta:g}"
                + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")
                + (f", plus {self.rpo_alpha:g} x the chosen answers' NLL per token (RPO)" if self.rpo_alpha else "")
                + ", over the answers' " + ("per-token mean" if self.loss_type == "ipo" else "summed")
                + " log-probabilities (logits path)")

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("beta", "loss_type", "label_smoothing", "rpo_alpha")}


@dataclass
class DPOArgs(DPOSettings, StartingModelArgs):
    """Preference-tune a Hugging Face causal LM with DPO on chosen/rejected pairs (sigmoid loss)."""

    model_name_or_path: str = flag("exported/finetuned", "Hugging Face model folder to start from (and the "
                                   "reference model), usually a fine-tuned one")
    data: str = flag("data/dpo_demo/train.jsonl",
                     "JSONL/Parquet file or datasets folder of 'prompt' (or chat 'messages'), 'chosen' and 'rejected' "
                     "rows (the default demo pairs are built on first use)")
    val_data: Optional[str] = flag(None, "held-out pairs; default: the demo's val.jsonl, or --val_fraction of --data")
    output_dir: str = flag("runs/dpo", "folder for metrics.jsonl, config.json, checkpoints/ and the reference "
                           "log-probabilities")


class DPOLoss:
    """The objective the loop trains and evaluates with: called like CausalLMLoss on a batch of
    PreferenceSamples; sums the rewards on the device until `take_metrics` reports their means.

    The chosen answers' loss per token is reported too (`nll_chosen`, nats per token; at
    evaluation the held-out response loss), and a run whose held-out value rises more than
    LIKELIHOOD_DROP_WARN above its first evaluation is warned, once: preference metrics can look
    excellent while the model forgets how to answer."""

    perplexity = False  # a mean per pair

    def __init__(self, settings: DPOSettings, warn: Callable[[str], Any] = print,
                 watch: dict[str, Any] | None = None):
        self.settings = settings
        self._warn = warn
        self._watch = {} if watch is None else watch  # shared with evaluation copies: the start, the warning
        self.sums = DeviceSums()

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        s = self.settings
        inputs = dict(inputs)
        reference = inputs.pop("reference_logps").to(targets.device, torch.float32)
        logps = sequence_logps(forward, inputs, targets)
        n = logps.shape[0] // 2
        tokens = (targets != IGNORE).sum(dim=1).clamp(min=1).float()
        scale = tokens if s.loss_type == "ipo" else torch.ones_like(tokens)  # IPO: per-token means
        loss, chosen, rejected = dpo_loss(logps[:n] / scale[:n], logps[n:] / scale[n:], reference[:n] / scale[:n],
                                          reference[n:] / scale[n:], s.beta, s.loss_type, s.label_smoothing)
        nll_chosen = -logps[:n] / tokens[:n]  # per pair: the chosen answer's loss per token
        if s.rpo_alpha:
            loss = loss + s.rpo_alpha * nll_chosen
        self.sums.add(reward_chosen=chosen.sum(), reward_rejected=rejected.sum(), reward_margin=(chosen - rejected).sum(),
                      reward_accuracy=(chosen > rejected).sum(), logp_accuracy=(logps[:n] > logps[n:]).sum(),
                      logps_chosen=logps[:n].sum(), logps_rejected=logps[n:].sum(), nll_sum=-logps[:n].sum(),
                      chosen_tokens=tokens[:n].sum(), pairs=n)
        return loss.sum() if reduction == "sum" else loss.mean()

    def for_evaluation(self) -> "DPOLoss":
        """A copy with sums of its own, so an evaluation between two log lines leaves the training sums alone."""
        return DPOLoss(self.settings, self._warn, self._watch)

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """Means per pair of the rewards and log-probabilities since the last call, and the chosen
        answers' loss per token, over all ranks (a collective)."""
        if not self.sums:
            return {}
        totals = self.sums.read()
        count = max(1.0, totals["pairs"])
        found = {f"{prefix}{name}": totals[name] / count for name in STATS}
        found[f"{prefix}nll_chosen"] = totals["nll_sum"] / max(1.0, totals["chosen_tokens"])
        if prefix == "val_":
            self._watch_likelihood(found["val_nll_chosen"])
        return found

    def _watch_likelihood(self, nll: float) -> None:
        start = self._watch.setdefault("start", nll)
        if nll - start > LIKELIHOOD_DROP_WARN and not self._watch.get("warned"):
            self._watch["warned"] = True
            self._warn(f"WARNING: the held-out chosen answers' loss rose from {start:.2f} to {nll:.2f} nats per token "
                       f"(more than {LIKELIHOOD_DROP_WARN}): the policy is unlearning the answers it prefers while "
                       "the preference metrics improve; add --rpo_alpha 1 (an NLL term on the chosen answers), or "
                       "lower the learning rate or raise --beta")


class DPO(Objective):
    """Direct preference optimisation over chosen/rejected pairs, against stored reference scores."""

    name = "dpo"
    title = "DPO"
    supports = Supports(why_not="preference pairs are scored whole, by the reference and the policy alike")

    def __init__(self, settings: DPOSettings, reference):
        self.settings = settings
        self.reference = reference  # a train.reference.StoredReference

    def make_step(self, setup: StepSetup) -> tuple[DataParallelStep, dict[str, Any]]:
        run = setup.run
        self.reference.attach(setup.engine, run)
        run.say(self.settings.describe())
        return DataParallelStep(setup.batches, run.batch, run.env, DPOLoss(self.settings, warn=run.say)), {}

    def line_text(self, record: dict[str, Any]) -> str:
        return (f" | reward acc {record['reward_accuracy']:.3f} margin {record['reward_margin']:.3f} | chosen "
                f"NLL {record['nll_chosen']:.3f}/token")

    def config_record(self) -> dict[str, Any]:
        return {"preference": self.settings.record()}
