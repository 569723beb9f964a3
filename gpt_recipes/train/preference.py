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
with the run, keyed to the data and the model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from gpt_recipes.checkpoints.paths import REFERENCE_LOGPS
from gpt_recipes.data import sft
from gpt_recipes.data.sft import IGNORE, Example
from gpt_recipes.errors import UserError
from gpt_recipes.parallel.distributed import all_reduce

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


def _answer(value: Any, key: str, where: str) -> str:
    """A chosen/rejected answer given as text, an assistant message, or a list holding one."""
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
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: empty prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        # A conversation so far; the answers are its next assistant turn.
        messages = sft.to_messages({"messages": [*prompt, {"role": "assistant", "content": "-"}]}, where)[:-1]
    chosen, rejected = _answer(row["chosen"], "chosen", where), _answer(row["rejected"], "rejected", where)
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


class PreferenceSamples:
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


@dataclass(frozen=True)
class PreferenceObjective:
    """DPO's settings: beta, the loss (TRL's names), label smoothing, and the NLL weight (rpo_alpha)."""

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None

    def check(self) -> None:
        if not self.beta > 0:
            raise UserError(f"--beta must be positive, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise UserError(f"--label_smoothing applies to the sigmoid loss (conservative DPO), not --loss_type "
                            f"{self.loss_type}")
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise UserError(f"--rpo_alpha must be 0 or positive, got {self.rpo_alpha}")

    def describe(self) -> str:
        form = {"sigmoid": "DPO (sigmoid)", "hinge": "SLiC (hinge)", "ipo": "IPO"}[self.loss_type]
        return (f"Loss: {form}, beta {self.beta:g}"
                + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")
                + (f", plus {self.rpo_alpha:g} x the chosen answers' NLL per token (RPO)" if self.rpo_alpha else "")
                + ", over the answers' " + ("per-token mean" if self.loss_type == "ipo" else "summed")
                + " log-probabilities (logits path)")


class DPOLoss:
    """The objective the loop trains and evaluates with: called like CausalLMLoss on a batch of
    PreferenceSamples; keeps the rewards' sums until `take_metrics` reports their means.

    The chosen answers' loss per token is reported too (`nll_chosen`, nats per token; at
    evaluation the held-out response loss), and a run whose held-out value rises more than
    LIKELIHOOD_DROP_WARN above its first evaluation is warned, once: preference metrics can look
    excellent while the model forgets how to answer."""

    reports_perplexity = False
    fused = False

    def __init__(self, objective: PreferenceObjective, warn: Callable[[str], Any] = print,
                 watch: dict[str, Any] | None = None):
        self.objective = objective
        self.beta = objective.beta
        self._warn = warn
        self._watch = {} if watch is None else watch  # shared with evaluation copies: the start, the warning
        self._sums: torch.Tensor | None = None
        self._pairs = 0

    def __call__(self, forward: Callable[..., Any], inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        inputs = dict(inputs)
        reference = inputs.pop("reference_logps").to(targets.device, torch.float32)
        logps = sequence_logps(forward, inputs, targets)
        n = logps.shape[0] // 2
        tokens = (targets != IGNORE).sum(dim=1).clamp(min=1).float()
        scale = tokens if self.objective.loss_type == "ipo" else torch.ones_like(tokens)  # IPO: per-token means
        loss, chosen, rejected = dpo_loss(logps[:n] / scale[:n], logps[n:] / scale[n:], reference[:n] / scale[:n],
                                          reference[n:] / scale[n:], self.beta, self.objective.loss_type,
                                          self.objective.label_smoothing)
        nll_chosen = -logps[:n] / tokens[:n]  # per pair: the chosen answer's loss per token
        if self.objective.rpo_alpha:
            loss = loss + self.objective.rpo_alpha * nll_chosen
        with torch.no_grad():
            stats = torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                 (chosen > rejected).float().sum(), (logps[:n] > logps[n:]).float().sum(),
                                 logps[:n].sum(), logps[n:].sum(), -logps[:n].sum(), tokens[:n].sum()])
            self._sums = stats if self._sums is None else self._sums + stats
            self._pairs += n
        return loss.sum() if reduction == "sum" else loss.mean()

    def for_evaluation(self) -> "DPOLoss":
        """A copy with sums of its own, so an evaluation between two log lines leaves the training sums alone."""
        return DPOLoss(self.objective, self._warn, self._watch)

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """Means per pair of the rewards and log-probabilities since the last call, and the chosen
        answers' loss per token, over all ranks (a collective)."""
        if self._sums is None:
            return {}
        totals = all_reduce(torch.cat([self._sums.double(), self._sums.new_tensor([self._pairs]).double()]))
        self._sums, self._pairs = None, 0
        count = max(1.0, totals[-1].item())
        values = totals[:-1].tolist()
        found = {f"{prefix}{name}": value / count for name, value in zip(STATS, values)}
        found[f"{prefix}nll_chosen"] = values[len(STATS)] / max(1.0, values[len(STATS) + 1])
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


@torch.no_grad()
def reference_logps(engine, samples: PreferenceSamples, micro_batch: int, rank: int, world_size: int,
                    progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """(pairs, 2) summed answer log-probabilities under the engine's model, each rank scoring a
    strided share; every rank runs the same number of forwards (ZeRO-3 gathers in each)."""
    total = len(samples)
    per_rank = math.ceil(total / world_size)
    out = torch.zeros(total, 2, dtype=torch.float64, device=engine.device)
    engine.eval()
    reference, samples.reference = samples.reference, None
    for start in range(0, per_rank, micro_batch):
        mine = np.arange(rank + start * world_size, rank + min(start + micro_batch, per_rank) * world_size,
                         world_size)
        real = mine[mine < total]
        idx = real if len(real) else np.array([0])  # a rank with nothing left still joins the forward
        inputs, targets = samples.batch(idx)
        device = engine.device
        logps = sequence_logps(engine, {k: v.to(device) for k, v in inputs.items()}, targets.to(device))
        if len(real):
            out[torch.as_tensor(real, device=device)] = logps.double().view(2, -1).T[: len(real)]
        progress(min(len(idx) * world_size, total - start * world_size))
    samples.reference = reference
    engine.train()
    return all_reduce(out).cpu()


def reference_fingerprint(model_fingerprint: str, precision: str, train: PreferenceSamples,
                          val: PreferenceSamples) -> str:
    """What stored reference log-probabilities belong to: the starting model, the precision it
    ran in, and every pair's tokens."""
    parts = [model_fingerprint, precision, train.fingerprint(), val.fingerprint()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_reference(out_dir: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Stored reference log-probabilities of a run being resumed, checked to be of this data and model."""
    from gpt_recipes.checkpoints.saving import load_own

    path = out_dir / REFERENCE_LOGPS
    if not path.is_file():
        raise UserError(f"--resume: {path} is missing, and the starting model it was computed with is gone; "
                        "start the run again with --overwrite")
    stored = load_own(path)
    if stored.get("fingerprint") != fingerprint:
        raise UserError(f"--resume: {path} holds reference log-probabilities of other data or another starting "
                        "model (or precision) than this run's; resume with the same --data, --val_data, "
                        "--model_name_or_path, length flags and DeepSpeed precision")
    return stored


def save_reference(out_dir: Path, fingerprint: str, train: torch.Tensor, val: torch.Tensor) -> None:
    from gpt_recipes.folders import fsync_path

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{REFERENCE_LOGPS}.tmp"
    torch.save({"fingerprint": fingerprint, "train": train, "val": val}, tmp)
    fsync_path(tmp)
    tmp.replace(out_dir / REFERENCE_LOGPS)
