"""Group-relative policy optimisation (GRPO) with the user's reward functions, on the training engine.

Each step takes global_batch / G prompts in the global batch order; their G completions each
make the global batch of completions, which the ranks share as they share any global batch
(rank r generates and trains on its consecutive part). A rank samples its completions from
the live model with a KV cache (transformers' generate); under ZeRO-3 every rank runs the same
number of generate calls with synced_gpus, so each forward gathers the partitioned layers one
by one and no rank holds a second copy. The rewards of the whole global batch are gathered,
each group's advantages normalised, and the loss taken over completion tokens only:

    ratio = exp(logp - logp_old),  loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_t

with one optimizer step per generation (as TRL's default, num_iterations 1) logp_old is logp
itself, detached: the ratio is 1 and its gradient is A times that of logp. KL_t is the k3
estimate exp(ref - logp) - (ref - logp) - 1 against the starting model, taken only when beta > 0
(with LoRA the base with the adapters disabled; without LoRA a frozen copy of the starting model,
see `reference_engine`).
`--loss_type grpo` averages each completion's token losses, then the completions; `dr_grpo`
sums every token's loss over the batch and divides by completions x max_completion_length (Dr.
GRPO, Liu et al. 2025). Either way the loss is a mean over the global batch, however it is split
into ranks and micro-batches: each micro-batch adds its part, normalised by global counts.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import math
import numbers
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gpt_recipes.args import POSITIVE, Flags, StartingModelArgs, at_least, flag, within
from gpt_recipes.data.samples import Samples
from gpt_recipes.ds_config import BatchPlan
from gpt_recipes.errors import UserError, first_line
from gpt_recipes.metrics.device_sums import DeviceSums
from gpt_recipes.parallel.distributed import DistEnv, all_reduce
from gpt_recipes.parallel.layout import Supports
from gpt_recipes.checkpoints.paths import BestMetric
from gpt_recipes.metrics.summary import Column, Curve, Report
from gpt_recipes.train.objective import Objective, StepResult, StepSetup
from gpt_recipes.train.preemption import ending_together
from gpt_recipes.train.preference import prompt_messages

LOSS_TYPES = ("grpo", "dr_grpo")
# The reward functions' own arguments: no data column may take their names.
RESERVED_COLUMNS = frozenset({"prompts", "completions"})


@dataclass
class GRPOSettings(Flags):
    """GRPO's own flags, by TRL's names."""

    reward_funcs: list[str] = flag(["gpt_recipes.data.grpo_rewards:reference_overlap",
                                    "gpt_recipes.data.grpo_rewards:full_sentence"],
                                   "reward functions as FILE.py:NAME or module:NAME, called as f(prompts, completions, "
                                   "**columns) -> list[float | None] (TRL's signature)", commas=False)
    reward_weights: list[float] = flag([], "one weight per reward function (default: 1 each); a completion's reward "
                                       "is the weighted sum")
    num_generations: int = flag(8, "completions per prompt (G): a group whose rewards are compared",
                                at_least(2, "must be at least 2 (advantages compare completions of one prompt)"))
    max_completion_length: int = flag(32, "tokens generated per completion at most", at_least(1))
    temperature: float = flag(1.0, "sampling temperature", POSITIVE)
    top_p: float = flag(1.0, "nucleus sampling: keep the most likely tokens up to this probability",
                        within(0, 1, low_in=False))
    beta: float = flag(0.0, "KL coefficient to the starting model (0, TRL's default, computes no KL); with --use_peft "
                       "the base with adapters disabled is that model, else a frozen copy (partitioned under ZeRO-3)",
                       at_least(0, "must be >= 0"))
    epsilon: float = flag(0.2, "clip range of the policy ratio", POSITIVE)
    loss_type: str = flag("grpo", "grpo: mean over each completion's tokens, then over completions; dr_grpo: sum over "
                          "tokens / (completions x max_completion_length)", choices=LOSS_TYPES)
    scale_rewards: bool = flag(True, "divide advantages by their group's reward std")

    def check_batch(self, plan: BatchPlan) -> None:
        if plan.global_batch % self.num_generations:
            raise UserError(f"the global batch ({plan.global_batch} completions = micro-batch {plan.micro_batch} x "
                            f"accumulation {plan.grad_accum} x {plan.world_size} ranks) is not divisible by "
                            f"--num_generations {self.num_generations}; change one so whole groups fit a step")

    def prompts_per_step(self, plan: BatchPlan) -> int:
        return plan.global_batch // self.num_generations

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("num_generations", "max_completion_length", "temperature",
                                                       "top_p", "beta", "epsilon", "loss_type", "scale_rewards")}


@dataclass
class GRPOArgs(GRPOSettings, StartingModelArgs):
    """Train a Hugging Face causal LM with GRPO against reward functions (TRL's names for GRPO's own flags)."""

    model_name_or_path: str = flag("exported/finetuned", "Hugging Face model folder to start from, usually a "
                                   "fine-tuned one")
    data: str = flag("data/grpo_demo/train.jsonl", "JSONL/Parquet file or datasets folder of 'prompt' rows (text or "
                     "chat messages); other columns reach the reward functions (the default demo prompts are built "
                     "on first use)")
    val_data: Optional[str] = flag(None, "held-out prompts; default: a val.jsonl beside a train.jsonl, or "
                                   "--val_fraction of --data")
    output_dir: str = flag("runs/grpo", "folder for metrics.jsonl, config.json and checkpoints/")


# --- Reward functions -----------------------------------------------------------------------------


@dataclass
class RewardFunc:
    name: str
    func: Callable[..., list]
    weight: float


def _load_callable(spec: str) -> Callable:
    if ":" not in spec:
        raise UserError(f"--reward_funcs {spec!r}: name a function as FILE.py:NAME or module:NAME")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") and not Path(where).is_file():
        raise UserError(f"--reward_funcs {spec}: {where} does not exist")
    argv = sys.argv
    sys.argv = [where]  # a file that parses flags at import reads none of the recipe's
    try:
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(f"reward_{Path(where).stem}", where)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (Exception, SystemExit, KeyboardInterrupt) as err:  # an exit at import must not end the run quietly
        raise UserError(f"--reward_funcs {spec}: {where} could not be imported: {_what_happened(err)}")
    finally:
        sys.argv = argv
    func = getattr(module, name, None)
    if not callable(func):
        raise UserError(f"--reward_funcs {spec}: {where} has no function {name!r}")
    return func


def _check_signature(spec: str, func: Callable) -> None:
    """TRL's signature: func(prompts, completions, **columns) -> list[float | None]."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in params}
    takes_rest = any(p.kind == p.VAR_KEYWORD for p in params)
    if not takes_rest or not ({"prompts", "completions"} <= names or len(positional) >= 2
                              or any(p.kind == p.VAR_POSITIONAL for p in params)):
        raise UserError(f"--reward_funcs {spec}: expected the signature (prompts, completions, **kwargs) -> "
                        f"list[float], got {inspect.signature(func)}")


def load_reward_funcs(specs: list[str], weights: list[float]) -> list[RewardFunc]:
    if not specs:
        raise UserError("--reward_funcs names no function; give one or more as FILE.py:NAME or module:NAME")
    if weights and len(weights) != len(specs):
        raise UserError(f"--reward_weights gives {len(weights)} weights for {len(specs)} --reward_funcs")
    funcs = []
    for k, spec in enumerate(specs):
        func = _load_callable(spec)
        _check_signature(spec, func)
        funcs.append(RewardFunc(spec.rsplit(":", 1)[1], func, weights[k] if weights else 1.0))
    names = [f.name for f in funcs]
    if len(set(names)) != len(names):
        raise UserError("--reward_funcs: two functions share a name; the name keys their metrics")
    return funcs


def _what_happened(err: BaseException) -> str:
    """An exception as one line: its message, or for an exit, the exit and its status."""
    if isinstance(err, SystemExit):
        return f"it called exit ({err.code!r})"
    if isinstance(err, KeyboardInterrupt):
        return "it raised KeyboardInterrupt"
    return f"{type(err).__name__}: {first_line(err)}"


def score(funcs: list[RewardFunc], prompts: list, completions: list[str], columns: dict[str, list]) -> torch.Tensor:
    """(completions, functions) rewards; None (not applicable) becomes NaN. Each function gets its own
    copy of the inputs. A function that fails (an exit included), returns the wrong length or a
    non-number stops the run in one line naming it."""
    table = torch.full((len(completions), len(funcs)), float("nan"), dtype=torch.float64)
    for j, reward in enumerate(funcs):
        inputs = copy.deepcopy({"prompts": prompts, "completions": completions, **columns})
        try:
            values = reward.func(**inputs)
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            raise UserError(f"reward function {reward.name} failed: {_what_happened(err)}")
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(f"reward function {reward.name} returned {got} values for {len(completions)} completions; "
                            "it must return one number (or None) per completion")
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)) \
                    or not math.isfinite(float(value)):
                raise UserError(f"reward function {reward.name} returned {value!r} for completion {i}; rewards must be "
                                "finite numbers or None")
            table[i, j] = float(value)
    return table


def combine(table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each completion's reward: the weighted sum over the functions that apply (NaN skipped)."""
    return torch.nansum(table * weights, dim=1)


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each group's reward std): reward minus its group's mean, divided by the group's
    std (+1e-4) when `scale`."""
    grouped = rewards.view(-1, group)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    advantages = grouped - mean
    if scale:
        advantages = advantages / (std + 1e-4)
    return advantages.flatten(), std.flatten()


# --- The objective --------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token, entropy of each position's distribution), fp32."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return chosen, entropy


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float,
                       ref_logps: torch.Tensor | None = None, beta: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss, where the ratio was clipped, per-token KL or None); advantages per sequence."""
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    a = advantages.unsqueeze(-1)
    loss = -torch.min(ratio * a, clipped * a)
    was_clipped = (ratio * a > clipped * a).float()
    kl = None
    if beta > 0 and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return loss, was_clipped, kl


def loss_share(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, global_completions: int,
               max_completion_length: int) -> torch.Tensor:
    """This micro-batch's part of the global batch's loss (the parts of all micro-batches of all
    ranks sum to it)."""
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / global_completions
    return masked.sum() / (global_completions * max_completion_length)


# --- Prompts ---------------------------------------------------------------------------------------


class Prompts(Samples):
    """Prompt rows rendered with the chat template up to the assistant's turn, tokenised; their other
    columns go to the reward functions. The step generates from them (there is no `batch`)."""

    def __init__(self, rows: list[tuple[str, dict]], tokenizer, max_prompt_tokens: int):
        self.texts, self.ids, self.columns = [], [], []
        self.prompts: list = []  # as the reward functions receive them: text, or the messages
        for where, row in rows:
            prompt = row.get("prompt")
            if not isinstance(prompt, (str, list)):
                raise UserError(f"{where}: needs a 'prompt' (text, or a list of chat messages)")
            reserved = sorted(RESERVED_COLUMNS & set(row))
            if reserved:
                raise UserError(f"{where}: a column named {reserved[0]!r} would collide with the reward functions' own "
                                f"argument of that name; rename the column")
            messages = prompt_messages(prompt, where)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_tokens:
                raise UserError(f"{where}: the prompt is {len(ids)} tokens; with --max_completion_length the model "
                                f"allows {max_prompt_tokens} (lower --max_completion_length, or shorten the prompt)")
            self.prompts.append(prompt)
            self.texts.append(text)
            self.ids.append(ids)
            self.columns.append({k: v for k, v in row.items() if k != "prompt"})

    def __len__(self) -> int:
        return len(self.ids)

    def num_tokens(self, indices: np.ndarray) -> int:
        return sum(len(self.ids[i]) for i in indices)

    def num_targets(self, indices: np.ndarray) -> int:
        return len(indices)

    def column_lists(self, indices: list[int]) -> dict[str, list]:
        keys = sorted({k for i in indices for k in self.columns[i]})
        return {k: [self.columns[i].get(k) for i in indices] for k in keys}


def left_padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask


@dataclass
class Rollout:
    """Completions of some prompts: the tokens, a mask over completion tokens up to and including
    EOS, their text, and whether each ended (EOS) before the length limit."""

    prompt_ids: torch.Tensor  # left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    ended: torch.Tensor


@torch.no_grad()
def generate(model, prompts: Prompts, indices: list[int], settings: GRPOSettings, tokenizer, pad_id: int,
             synced: bool, greedy: bool = False) -> Rollout:
    prompt_ids, prompt_mask = left_padded([prompts.ids[i] for i in indices], pad_id)
    device = next(model.parameters()).device
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": settings.temperature,
                                                    "top_p": settings.top_p, "top_k": 0}
    out = model.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                         max_new_tokens=settings.max_completion_length, pad_token_id=pad_id,
                         eos_token_id=tokenizer.eos_token_id, synced_gpus=synced, **sampling).cpu()
    completion = out[:, prompt_ids.shape[1]:]
    is_eos = completion == tokenizer.eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((len(indices),), completion.shape[1]))
    positions = torch.arange(completion.shape[1])[None]
    mask = (positions <= first_eos[:, None]).long() if completion.shape[1] else torch.zeros_like(completion)
    mask = mask[:, :completion.shape[1]]
    texts = [tokenizer.decode(row[:int(n)], skip_special_tokens=True) for row, n in zip(completion, first_eos)]
    return Rollout(prompt_ids, prompt_mask, completion, mask, texts, is_eos.any(1))


def rollout_logps(model, rollout: Rollout, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, entropies) of completion tokens rows[...] under `model`."""
    p_ids, p_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
    c_ids = rollout.completion_ids[rows]
    input_ids = torch.cat([p_ids, c_ids], 1)
    attention = torch.cat([p_mask, torch.ones_like(c_ids)], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                   position_ids=positions.to(device)).logits
    width = c_ids.shape[1]
    logits = logits[:, -width - 1:-1]  # the positions that predict the completion tokens
    return token_logps(logits, c_ids.to(device))


def reference_engine(build: Callable[[], torch.nn.Module], ds_cfg: dict) -> Callable[..., object]:
    """The starting model, frozen, for the KL term of a run without LoRA: under ZeRO-3 partitioned as
    the policy is (an inference engine without optimizer; each rank holds 1/N of it and every
    forward gathers a layer at a time, as TRL does with DeepSpeed), at ZeRO 0-2 a whole copy on each
    rank, in the run's precision."""
    import copy

    import deepspeed

    cfg = {k: v for k, v in copy.deepcopy(ds_cfg).items() if k not in ("optimizer", "scheduler")}
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        cfg["zero_optimization"] = {"stage": 0}
    model = build()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


# --- The loop's step -------------------------------------------------------------------------------

# Per completion, gathered from every rank with the rewards at each step (the gather GRPO needs
# anyway): the columns after the reward functions' ones.
GATHERED = ("tokens", "length", "ended", "failed")


def _first_problem(mine: str | None) -> str:
    """The first rank's reward failure, on every rank."""
    if not torch.distributed.is_initialized():
        return mine or "a reward function failed"
    every: list = [None] * torch.distributed.get_world_size()
    try:
        torch.distributed.all_gather_object(every, mine)
    except Exception:  # a rank that already had every message may have ended before this one got its own
        return mine or "a reward function failed on another rank (its message is above)"
    return next(p for p in every if p is not None)


class GRPOStep:
    """Generate, score, train: the loop's step for GRPO (see the module's docstring)."""

    probes_memory = False

    def __init__(self, batches, plan: BatchPlan, env: DistEnv, settings: GRPOSettings, rewards: list[RewardFunc],
                 tokenizer, pad_id: int, seed: int, zero3: bool, reference=None, warn: Callable[[str], None] = print):
        self.batches, self.plan, self.env, self.settings = batches, plan, env, settings
        self.warn, self.warned = warn, False
        self.rewards, self.tokenizer, self.pad_id, self.seed = rewards, tokenizer, pad_id, seed
        self.synced = zero3 and env.world_size > 1
        self.reference = reference  # a frozen copy of the starting model, or None: the base under LoRA
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float64)
        self.sums = DeviceSums()
        self.steps = 0

    def _my_completions(self, global_batch: np.ndarray) -> list[int]:
        """This rank's consecutive part of the global batch of completions, as prompt indices."""
        every = np.repeat(global_batch, self.settings.num_generations)
        n = self.plan.per_rank
        start = self.plan.data_rank(self.env.rank) * n
        return [int(i) for i in every[start:start + n]]

    def _rollouts(self, model, mine: list[int], step: int) -> list[Rollout]:
        # Seeded by step and rank: a resumed run samples what the uninterrupted one did.
        torch.manual_seed(hash((self.seed, step, self.env.rank)) % 2**63)
        micro = self.plan.micro_batch
        return [generate(model, self.batches.train, mine[k:k + micro], self.settings, self.tokenizer, self.pad_id,
                         self.synced) for k in range(0, len(mine), micro)]

    def _gathered(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Every rank's (completions, columns) table, in global order."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world == 1:
            return table
        parts = [torch.empty_like(table, device=device) for _ in range(world)]
        torch.distributed.all_gather(parts, table.to(device))  # on the engine's device: NCCL moves no CPU tensors
        parts = [p.cpu() for p in parts]
        data_ranks = [self.plan.data_rank(r) for r in range(world)]
        firsts = [data_ranks.index(d) for d in range(self.plan.world_size)]
        return torch.cat([parts[r] for r in firsts])

    def _score(self, engine, rollouts: list[Rollout], mine: list[int]) -> torch.Tensor:
        """(completions of the global batch, reward functions + GATHERED) on every rank. A reward function
        that fails on any rank stops every rank with its message and the rank it failed on."""
        texts = [t for r in rollouts for t in r.texts]
        table, problem = self._score_here(self.batches.train, mine, texts)
        failed = torch.full((len(texts), 1), float(problem is not None), dtype=torch.float64)
        tokens = torch.cat([r.prompt_mask.sum(1) + r.completion_mask.sum(1) for r in rollouts]).double()
        lengths = torch.cat([r.completion_mask.sum(1) for r in rollouts]).double()
        ended = torch.cat([r.ended for r in rollouts]).double()
        everything = self._gathered(torch.cat([table, tokens[:, None], lengths[:, None], ended[:, None], failed], 1),
                                    engine.device)
        if everything[:, -1].any():  # the gather the step needs anyway says so; only then are messages exchanged
            ending_together()
            raise UserError(_first_problem(problem))
        return everything

    def _score_here(self, prompts: Prompts, indices: list[int], texts: list[str]) -> tuple[torch.Tensor, str | None]:
        """This rank's rewards, or NaNs and the failure's message (with this rank) for every rank to hear of."""
        try:
            return score(self.rewards, [prompts.prompts[i] for i in indices], texts, prompts.column_lists(indices)), None
        except UserError as err:
            return torch.full((len(texts), len(self.rewards)), float("nan"), dtype=torch.float64), \
                f"{err} (on rank {self.env.rank})"

    def __call__(self, engine, step: int, global_batch: np.ndarray, probe, window) -> StepResult:
        s, plan = self.settings, self.plan
        mine = self._my_completions(global_batch)
        start = time.perf_counter()
        engine.eval()
        rollouts = self._rollouts(engine.module, mine, step)
        engine.train()
        generation_s = time.perf_counter() - start
        everything = self._score(engine, rollouts, mine)
        k = len(self.rewards)
        rewards = combine(everything[:, :k], self.weights)
        advantages, group_std = group_advantages(rewards, s.num_generations, s.scale_rewards)
        self._warn_if_no_signal(step, everything[:, :k], group_std)
        first = plan.data_rank(self.env.rank) * plan.per_rank
        my_advantages = advantages[first:first + plan.per_rank].float()
        train_start = time.perf_counter()
        total = torch.zeros((), device=engine.device)
        for i, rollout in enumerate(rollouts):
            a = my_advantages[i * plan.micro_batch:(i + 1) * plan.micro_batch].to(engine.device)
            total += self._train_on(engine, rollout, a)
        self.sums.add(generation_ms=generation_s * 1000, training_ms=(time.perf_counter() - train_start) * 1000)
        self._add_gathered(everything, rewards, group_std)
        return StepResult(total, int(everything[:, k].sum().item()))

    def _warn_if_no_signal(self, step: int, table: torch.Tensor, group_std: torch.Tensor) -> None:
        """Once a run: a step whose rewards cannot teach anything (every advantage 0), and why."""
        if self.warned:
            return
        why = ("every reward function returned None for every completion" if bool(table.isnan().all()) else
               "within every prompt's group the completions earned the same reward" if bool((group_std == 0).all())
               else None)
        if why:
            self.warned = True
            self.warn(f"WARNING: step {step + 1}: {why}, so every advantage is 0 and the step teaches nothing; a "
                      "reward that cannot tell completions of one prompt apart gives no learning signal (said once)")

    def _train_on(self, engine, rollout: Rollout, advantages: torch.Tensor) -> torch.Tensor:
        """One micro-batch of completions: the clipped loss, backward and step; its figures summed on the device."""
        s, plan = self.settings, self.plan
        mask = rollout.completion_mask.to(engine.device).float()
        logps, entropy = rollout_logps(engine, rollout, slice(None))
        ref = None
        if s.beta > 0:
            with torch.no_grad(), (contextlib.nullcontext() if self.reference is not None
                                   else engine.module.disable_adapter()):
                starting = self.reference if self.reference is not None else engine.module
                ref, _ = rollout_logps(starting, rollout, slice(None))
        token_loss, clipped, kl = clipped_token_loss(logps, logps.detach(), advantages, s.epsilon, ref, s.beta)
        loss = loss_share(token_loss, mask, s.loss_type, plan.global_batch, s.max_completion_length)
        loss = loss * plan.grad_accum * plan.grad_divisor
        engine.backward(loss)
        engine.step()
        self.sums.add(clipped_tokens=(clipped * mask).sum(), entropy_sum=(entropy.detach() * mask).sum(),
                      completion_tokens=mask.sum(), **({"kl_sum": (kl.detach() * mask).sum()} if kl is not None else {}))
        return loss.detach()

    def _add_gathered(self, everything: torch.Tensor, rewards: torch.Tensor, group_std: torch.Tensor) -> None:
        """This step's figures of the whole global batch, which every rank holds alike."""
        k = len(self.rewards)
        lengths, ended = everything[:, k + 1], everything[:, k + 2]
        self.sums.add_shared(
            reward=rewards.mean().item(), reward_std=rewards.std().item(),
            frac_reward_zero_std=(group_std == 0).double().mean().item(),
            completion_length=lengths.mean().item(), completion_length_max=lengths.max().item(),
            completion_clipped=(1 - ended).mean().item(),
            **{f"rewards/{f.name}": torch.nanmean(everything[:, j]).item() for j, f in enumerate(self.rewards)})
        self.steps += 1

    def take_metrics(self, prefix: str = "") -> dict[str, float]:
        """Means since the last call: of the steps' figures (each over its global batch), of the
        completion tokens' clip share, entropy and KL, and of generation and training time per rank."""
        if not self.steps:
            return {}
        totals, steps = self.sums.read(), self.steps
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        tokens = max(1.0, totals.pop("completion_tokens"))
        out = {name: totals[name] / steps for name in ("reward", "reward_std", "frac_reward_zero_std",
                                                        "completion_length", "completion_length_max",
                                                        "completion_clipped")}
        out.update(clip_ratio=totals["clipped_tokens"] / tokens, entropy=totals["entropy_sum"] / tokens,
                   generation_ms=totals["generation_ms"] / (world * steps),
                   training_ms=totals["training_ms"] / (world * steps),
                   **{f"rewards/{f.name}": totals[f"rewards/{f.name}"] / steps for f in self.rewards})
        if "kl_sum" in totals:
            out["kl"] = totals["kl_sum"] / tokens
        self.steps = 0
        return {f"{prefix}{k}": v for k, v in out.items()}

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Greedy completions of the held-out prompts: their mean reward (val_reward, per function too)."""
        engine.eval()
        table, problem = torch.zeros((0, len(self.rewards)), dtype=torch.float64), None
        for idx in self.batches.val_micro_batches:
            indices = [int(i) for i in idx]
            rollout = generate(engine.module, self.batches.val, indices, self.settings, self.tokenizer, self.pad_id,
                               self.synced, greedy=True)  # every rank generates on: ZeRO-3 gathers need them all
            scored, failed = self._score_here(self.batches.val, indices, rollout.texts)
            table, problem = torch.cat([table, scored]), problem or failed
        engine.train()
        rewards = combine(table, self.weights)
        sums = torch.cat([torch.tensor([rewards.sum(), len(rewards), problem is not None], dtype=torch.float64),
                          torch.nan_to_num(table, nan=0.0).sum(0), (~table.isnan()).sum(0).double()])
        sums = all_reduce(sums.to(engine.device)).cpu()
        if sums[2] > 0:
            ending_together()
            raise UserError(_first_problem(problem))
        sums = torch.cat([sums[:2], sums[3:]])
        k = len(self.rewards)
        per = {f"val_rewards/{f.name}": (sums[2 + j] / sums[2 + k + j].clamp(min=1)).item()
               for j, f in enumerate(self.rewards)}
        return {"val_reward": (sums[0] / sums[1]).item(), **per}


def _first_and_last(key: str):
    def value(lines, measured):
        evals = [r[key] for r in lines if key in r]
        return (evals[0], evals[-1]) if evals else None
    return value


def _generation_share(lines, measured):
    """The median share of a step spent generating, over the log lines past warm-up."""
    shares = [r["generation_ms"] / (r["generation_ms"] + r["training_ms"]) for r in measured
              if r.get("generation_ms") is not None and r.get("training_ms") is not None]
    return statistics.median(shares) if shares else None


class GRPO(Objective):
    """Group-relative policy optimisation against the user's reward functions (see the module's docstring)."""

    name = "grpo"
    title = "GRPO"
    best = BestMetric("val_reward", higher_is_better=True)  # the held-out prompts' mean reward, greedily
    # Measured with --use_peft at ZeRO-3 on 2 CPU ranks (docs/bad_inputs.md): step 1 compiled for
    # 113 s, and step 2 was still compiling after 3 minutes.
    supports = Supports(why_not="generation runs the whole model on every rank", compiled=False,
                        why_not_compiled="each step's completions have new lengths, and each new length compiles the "
                        "model again (under ZeRO-3 with DeepSpeed's gather hooks of every submodule: minutes a step)")
    report = Report(
        columns=(Column("val_reward", "val reward first -> last", _first_and_last("val_reward"),
                        lambda pair: f"{pair[0]:.3f} -> {pair[1]:.3f}"),
                 Column("generation_share", "generating", _generation_share, "{:.0%}".format)),
        curves=(Curve("rewards.png", "GRPO rewards", "mean reward", "step", ("reward", "sampled"),
                      ("val_reward", "held-out (greedy)")),))

    def __init__(self, settings: GRPOSettings, rewards: list[RewardFunc], start):
        self.settings, self.rewards, self.start = settings, rewards, start  # start: pretrained.StartingModel

    def make_step(self, setup: StepSetup) -> tuple[GRPOStep, dict[str, Any]]:
        s, run, adapted = self.settings, setup.run, self.start.adapter is not None
        # The KL term's starting model: under LoRA the base with the adapters disabled, else a frozen copy.
        reference = reference_engine(self.start.builder(run, setup.seed), run.ds_cfg) if s.beta > 0 and not adapted \
            else None
        kl = ("the base with the adapters disabled" if adapted else "a frozen copy of the starting model"
              + (", partitioned" if setup.stage == 3 else ""))
        run.say(f"GRPO: {s.loss_type} loss, epsilon {s.epsilon:g}, beta {s.beta:g}"
                + (f" (KL to {kl})" if s.beta > 0 else " (no KL term)")
                + f"; rewards: {', '.join(f'{r.name} x {r.weight:g}' for r in self.rewards)}; sampling at temperature "
                f"{s.temperature:g}, top_p {s.top_p:g}, up to {s.max_completion_length} tokens")
        return GRPOStep(setup.batches, run.batch, run.env, s, self.rewards, self.start.tokenizer, self.start.pad_id,
                        setup.seed, zero3=setup.stage == 3, reference=reference, warn=run.say), {}

    def line_text(self, record: dict[str, Any]) -> str:
        """What the completions earned, and what generating them cost."""
        return (f" | reward {record['reward']:.3f} (std {record['reward_std']:.3f}) | length "
                f"{record['completion_length']:.1f} | generation {record['generation_ms']:.0f} ms, training "
                f"{record['training_ms']:.0f} ms")

    def config_record(self) -> dict[str, Any]:
        return {"grpo": self.settings.record(),
                "reward_funcs": [{"name": r.name, "weight": r.weight} for r in self.rewards]}
