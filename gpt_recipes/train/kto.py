"""Kahneman-Tversky optimisation (KTO; Ethayarajh et al., 2024) on unpaired rows, with TRL's semantics.

A row is a prompt, a completion and a label: true for a desirable completion, false for an
undesirable one (TRL's unpaired preference format: "prompt", "completion", "label"; the prompt
as text or chat messages, the completion as text or an assistant message). No row needs a
partner of the other kind. With r = log pi(completion) - log ref(completion), summed over the
completion's tokens, and z the reference point,

    desirable:    w_D * (1 - sigmoid(beta * (r - z)))
    undesirable:  w_U * (1 - sigmoid(beta * (z - r)))

averaged over every row of the global batch. z estimates the KL divergence between policy and
reference: the mean, over the global batch, of log pi - log ref of mismatched prompt/completion
pairs (row i's prompt with row i+1's completion, as TRL pairs them), clamped at 0 and not
differentiated. It is taken in a pass of its own before the step's micro-batches, so it is the
same for any split of the batch into ranks and micro-batches. The reference log-probabilities
of both sequences of every row are computed once, as for DPO (train/reference.py).

Logged as TRL does: rewards/chosen and rewards/rejected (beta * r, means over the desirable and
the undesirable rows), rewards/margins, logps/chosen and logps/rejected, kl (z); and
nll_chosen, the desirable completions' loss per token: the held-out response loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from gpt_recipes.args import POSITIVE, Flags, StartingModelArgs, flag
from gpt_recipes.data import sft
from gpt_recipes.data.sft import IGNORE, Example
from gpt_recipes.errors import UserError
from gpt_recipes.metrics.device_sums import DeviceSums
from gpt_recipes.parallel.distributed import all_reduce
from gpt_recipes.parallel.layout import Supports
from gpt_recipes.train.objective import Objective, StepResult, StepSetup
from gpt_recipes.train.preference import Pair, PreferenceSamples, answer_text, prompt_messages, sequence_logps
from gpt_recipes.train.step import DataParallelStep, to_device


@dataclass
class KTOSettings(Flags):
    """KTO's own flags, by TRL's names."""

    beta: float = flag(0.1, "KTO's beta: how far the policy may move from the reference (higher: less)", POSITIVE)
    desirable_weight: float = flag(1.0, "weight of the desirable rows' losses (TRL's desirable_weight)", POSITIVE)
    undesirable_weight: float = flag(1.0, "weight of the undesirable rows' losses (TRL's undesirable_weight)",
                                     POSITIVE)

    def record(self) -> dict[str, Any]:
        return {"beta": self.beta, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}


@dataclass
class KTOArgs(KTOSettings, StartingModelArgs):
    """Train a Hugging Face causal LM with KTO on unpaired desirable and undesirable completions."""

    model_name_or_path: str = flag("exported/finetuned", "Hugging Face model folder to start from (and the "
                                   "reference model), usually a fine-tuned one")
    data: str = flag("data/kto_demo/train.jsonl",
                     "JSONL/Parquet file or datasets folder of 'prompt' (text or chat messages), 'completion' and "
                     "'label' (true: desirable) rows (the default demo rows are built on first use)")
    val_data: Optional[str] = flag(None, "held-out rows; default: a val.jsonl beside a train.jsonl, or "
                                   "--val_fraction of --data")
    output_dir: str = flag("runs/kto", "folder for metrics.jsonl, config.json, checkpoints/ and the reference "
                           "log-probabilities")


# --- Rows ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    messages: list[dict[str, str]]  # the prompt
    completion: str
    desirable: bool
    example: Example | None = None  # prompt and completion, tokenised, the completion scored


def read_row(row: dict[str, Any], where: str) -> Row:
    """A row's prompt, completion and label; one line naming the row for anything else."""
    missing = [k for k in ("prompt", "completion", "label") if row.get(k) is None]
    if missing:
        raise UserError(f"{where}: a KTO row needs 'prompt', 'completion' and 'label' (missing {', '.join(missing)})")
    if not isinstance(row["label"], bool):
        raise UserError(f"{where}: 'label' must be true (a desirable completion) or false (an undesirable one), not "
                        f"{row['label']!r}")
    return Row(prompt_messages(row["prompt"], where), answer_text(row["completion"], "completion", where), row["label"])


def encode_rows(tokenizer, rows: list[tuple[str, dict]], seq_len: int, truncate: bool,
                say: Callable[[str], None]) -> list[Row]:
    """The rows read, tokenised and fitted to the length (dropped or truncated as fine-tuning's are)."""
    read = [read_row(row, where) for where, row in rows]
    for (where, _), row in zip(rows, read):
        row.example = sft.encode(tokenizer, [*row.messages, {"role": "assistant", "content": row.completion}], where,
                                 last_turn_only=True)

    def fit(items: list[Row], limit: int, cut: bool) -> tuple[list[Row], sft.LengthReport]:
        kept, truncated = [], 0
        for row in items:
            fitted, report = sft.fit_length([row.example], limit, cut)
            if fitted:
                row.example = fitted[0]
                kept.append(row)
                truncated += report.truncated
        return kept, sft.LengthReport(len(items), len(items) - len(kept), truncated)

    return sft.apply_length_policy(read, seq_len, truncate, say, fit=fit, noun="row")


def check_classes(rows: list[Row], what: str) -> tuple[int, int]:
    """(desirable, undesirable) rows; KTO needs both kinds, and two rows to mismatch for its KL estimate."""
    desirable = sum(r.desirable for r in rows)
    if desirable in (0, len(rows)):
        kind = "desirable (label true)" if desirable else "undesirable (label false)"
        raise UserError(f"{what}: every row is {kind}; KTO needs rows of both kinds to tell them apart")
    return desirable, len(rows) - desirable


def mismatched(tokenizer, rows: list[Row], seq_len: int, what: str) -> list[Example]:
    """Row i's prompt with row i+1's completion (the last with the first), cut to the length limit:
    the sequences KTO's KL estimate scores."""
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        ex = sft.encode(tokenizer, [*row.messages, {"role": "assistant", "content": other.completion}],
                        f"{what}: row {i + 1}'s prompt with row {i + 2}'s completion", last_turn_only=True)
        ex = Example(ex.ids[:seq_len + 1], ex.is_response[:seq_len + 1])
        out.append(ex if ex.is_response[1:].any() else row.example)  # a prompt too long to leave room: itself
    return out


class KTOSamples(PreferenceSamples):
    """KTO rows for the loop: a batch of n rows is 2n sequences, the rows' completions then the
    mismatched ones, with both reference log-probabilities and the rows' labels."""

    def __init__(self, rows: list[Row], kl_examples: list[Example], pad_id: int, pad_multiple: int = 1,
                 max_width: int | None = None):
        super().__init__([Pair(r.example, kl) for r, kl in zip(rows, kl_examples)], pad_id, pad_multiple, max_width)
        self.desirable = torch.tensor([r.desirable for r in rows])

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, targets = super().batch(indices)
        inputs["desirable"] = self.desirable[np.asarray(indices)]
        return inputs, targets


def halves(inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """A KTOSamples batch's rows (inputs, targets) and mismatched sequences (inputs, targets); the
    reference log-probabilities and labels are left out of both."""
    n = targets.shape[0] // 2
    model_inputs = {k: v for k, v in inputs.items() if k not in ("reference_logps", "desirable")}
    return ({k: v[:n] for k, v in model_inputs.items()}, targets[:n],
            {k: v[n:] for k, v in model_inputs.items()}, targets[n:])


# --- The loss and the step --------------------------------------------------------------------------


def kto_loss(logratio: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Each row's loss: w_D (1 - sigmoid(beta (r - z))) if desirable, else w_U (1 - sigmoid(beta (z - r)))."""
    wanted = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    unwanted = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, wanted, unwanted)


class KTOLoss:
    """KTO's loss over a KTOSamples micro-batch, at the reference point `kl` its step estimated;
    sums its figures on the device until `take_metrics`."""

    perplexity = False  # a mean per row

    def __init__(self, settings: KTOSettings):
        self.settings = settings
        self.kl = torch.zeros(())  # the reference point, set before each step by KTOStep
        self.eval_kl = torch.zeros(())  # the held-out set's, set before each evaluation
        self.sums = DeviceSums()
        self.estimates = 0

    def __call__(self, forward, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        s = self.settings
        desirable = inputs["desirable"].to(targets.device)
        n = desirable.shape[0]
        rows, row_targets, _, _ = halves(inputs, targets)
        logps = sequence_logps(forward, rows, row_targets)
        logratio = logps - inputs["reference_logps"][:n].to(logps.device, torch.float32)
        loss = kto_loss(logratio, self.kl.to(logps.device), desirable, s.beta, s.desirable_weight,
                        s.undesirable_weight)
        tokens = (row_targets != IGNORE).sum(dim=1).clamp(min=1).float()
        d, u = desirable.float(), (~desirable).float()
        rewards = s.beta * logratio.detach()
        self.sums.add(rewards_chosen=(rewards * d).sum(), rewards_rejected=(rewards * u).sum(), chosen=d.sum(),
                      rejected=u.sum(), logps_chosen=(logps.detach() * d).sum(), logps_rejected=(logps.detach() * u).sum(),
                      nll_sum=-(logps.detach() * d).sum(), chosen_tokens=(tokens * d).sum())
        return loss.sum() if reduction == "sum" else loss.mean()

    def set_reference_point(self, kl: torch.Tensor) -> None:
        self.kl = kl
        self.sums.add_shared(kl=kl)
        self.estimates += 1

    def for_evaluation(self) -> "KTOLoss":
        """A loss with figures of its own, at the held-out set's reference point."""
        loss = KTOLoss(self.settings)
        loss.set_reference_point(self.eval_kl)
        return loss

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """Means since the last call over all ranks (a collective): rewards and log-probabilities per
        desirable (chosen) and undesirable (rejected) row, the KL estimate, the desirable completions'
        loss per token. A kind of row the window did not see has no figures."""
        if not self.sums:
            return {}
        t = self.sums.read()
        out = {}
        for kind in ("chosen", "rejected"):
            if t[kind]:
                out[f"rewards/{kind}"] = t[f"rewards_{kind}"] / t[kind]
                out[f"logps/{kind}"] = t[f"logps_{kind}"] / t[kind]
        if t["chosen"] and t["rejected"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if t["chosen"]:
            out["nll_chosen"] = t["nll_sum"] / t["chosen_tokens"]
        out["kl"] = t["kl"] / max(1, self.estimates)
        self.estimates = 0
        return {f"{prefix}{k}": v for k, v in out.items()}


class KTOStep(DataParallelStep):
    """The data-parallel step, after a pass that estimates the reference point over the global batch."""

    loss_fn: KTOLoss

    @torch.no_grad()
    def reference_point(self, engine, samples: KTOSamples, micro_batches: list[np.ndarray]) -> torch.Tensor:
        """z: the mean over every rank's micro-batches of log pi - log ref of the mismatched
        sequences, clamped at 0 (on the device; nothing waits for it)."""
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        for idx in micro_batches:
            inputs, targets = to_device(samples.batch(idx), engine.device)
            _, _, kl_inputs, kl_targets = halves(inputs, targets)
            n = kl_targets.shape[0]
            logps = sequence_logps(engine, kl_inputs, kl_targets)
            total += torch.stack([(logps.double() - inputs["reference_logps"][n:].to(logps.device).double()).sum(),
                                  torch.tensor(float(n), dtype=torch.float64, device=engine.device)])
        all_reduce(total)
        return (total[0] / total[1]).clamp(min=0).float()

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe, window) -> StepResult:
        rank = self.plan.data_rank(self.env.rank)
        mine = [self.batches.order.micro_batch(step, rank, k) for k in range(self.plan.grad_accum)]
        self.loss_fn.set_reference_point(self.reference_point(engine, self.batches.train, mine))
        return super().__call__(engine, step, global_batch, probe, window)

    def evaluate(self, engine) -> dict[str, Any]:
        engine.eval()
        self.loss_fn.eval_kl = self.reference_point(engine, self.batches.val, self.batches.val_micro_batches)
        return super().evaluate(engine)


class KTO(Objective):
    """KTO against stored reference scores (see the module's docstring)."""

    name = "kto"
    title = "KTO"
    supports = Supports(why_not="its rows are scored whole, by the reference and the policy alike")

    def __init__(self, settings: KTOSettings, reference):
        self.settings = settings
        self.reference = reference  # a train.reference.StoredReference

    def make_step(self, setup: StepSetup) -> tuple[KTOStep, dict[str, Any]]:
        run, s = setup.run, self.settings
        self.reference.attach(setup.engine, run)
        run.say(f"Loss: KTO, beta {s.beta:g}, desirable weight {s.desirable_weight:g}, undesirable weight "
                f"{s.undesirable_weight:g}, over the completions' summed log-probabilities; the reference point is "
                "the KL estimate of mismatched prompt/completion pairs over each global batch")
        return KTOStep(setup.batches, run.batch, run.env, KTOLoss(s)), {}

    def line_text(self, record: dict[str, Any]) -> str:
        shown = [(f"rewards chosen {record['rewards/chosen']:.3f}" if "rewards/chosen" in record else ""),
                 (f"rejected {record['rewards/rejected']:.3f}" if "rewards/rejected" in record else ""),
                 (f"kl {record['kl']:.3f}" if "kl" in record else ""),
                 (f"chosen NLL {record['nll_chosen']:.3f}/token" if "nll_chosen" in record else "")]
        return "".join(f" | {text}" for text in shown if text)

    def config_record(self) -> dict[str, Any]:
        return {"kto": self.settings.record()}


def weights_note(settings: KTOSettings, desirable: int, undesirable: int) -> str | None:
    """The KTO paper's advice on the weights: w_D n_D / (w_U n_U) in [1, 4/3]; a note when outside."""
    ratio = settings.desirable_weight * desirable / (settings.undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    return (f"Note: desirable_weight x desirable rows / (undesirable_weight x undesirable rows) = {ratio:.2f}; the KTO "
            "paper recommends 1 to 4/3 (set --desirable_weight or --undesirable_weight to reach it)")
