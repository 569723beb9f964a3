"""Supervised fine-tuning data: load rows, render conversations, mask labels, pad or pack.

Rows come in two shapes: {"prompt": ..., "response": ...} pairs, and {"messages": [{"role",
"content"}, ...]} conversations. A pair is the conversation [user: prompt, assistant:
response]. Conversations are rendered with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE
when it has none (which is then saved with the model, so generation uses the same format).

A conversation is rendered and tokenised whole; the assistant turns are located by rendering
it incrementally (the text of the first k messages is a prefix of the text of the first k+1).
Only response tokens get labels; prompt tokens (and padding) get -100, so the loss is computed
on responses alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gpt_recipes.data.mixture import SourceIndex
from gpt_recipes.data.samples import Samples
from gpt_recipes.data.sources import check_utf8
from gpt_recipes.errors import UserError, first_line, root_line

IGNORE = -100

# Used when the tokenizer has no chat template of its own. Each turn starts with a header;
# an assistant turn ends with EOS, which is what generation stops on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: np.ndarray  # token ids of the whole conversation
    is_response: np.ndarray  # bool per token: does it get a label?


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL/JSON/Parquet file or a datasets folder (its 'train' split if it has splits)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise UserError(f"fine-tuning data {path} does not exist")
    if path.is_file() and path.suffix not in DATA_SUFFIXES:
        raise UserError(f"fine-tuning data {path}: expected a {', '.join(DATA_SUFFIXES)} file or a datasets folder")
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"fine-tuning data {path} holds no rows")
    if path.is_file() and path.suffix != ".parquet":
        check_utf8(path, "fine-tuning data")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            kind = "parquet" if path.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:
        raise UserError(f"could not read fine-tuning data {path}: {root_line(err)} (each row must be a JSON object)")
    if len(ds) == 0:
        raise UserError(f"fine-tuning data {path} holds no rows")
    return ds.to_list()


def read_split(data: str, val_data: str | None, val_fraction: float) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(train rows, validation rows), each row with a 'file row N' label for error messages: --val_data,
    else a val.jsonl beside a train.jsonl, else the first --val_fraction of the rows."""
    labelled = lambda path: [(f"{path} row {i + 1}", row) for i, row in enumerate(load_rows(path))]  # noqa: E731
    rows = labelled(data)
    val_path = val_data
    if val_path is None and Path(data).name == "train.jsonl" and (Path(data).parent / "val.jsonl").is_file():
        val_path = str(Path(data).parent / "val.jsonl")
    if val_path:
        return rows, labelled(val_path)
    held = max(1, round(val_fraction * len(rows)))
    if held >= len(rows):
        raise UserError(f"{data} holds {len(rows)} rows: too few to hold out a validation set")
    return rows[held:], rows[:held]


@dataclass
class RowSource:
    """One --data file's rows: its name keys the mixture's metrics."""

    name: str
    path: str
    train: list[tuple[str, dict]]
    val: list[tuple[str, dict]]


def source_names(paths: list[str]) -> list[str]:
    """Each file's name without its suffix, or with its folder where two files share one."""
    stems = [Path(p).stem for p in paths]
    names = [f"{Path(p).parent.name}/{stem}" if stems.count(stem) > 1 else stem for p, stem in zip(paths, stems)]
    if len(set(names)) != len(names):
        raise UserError(f"--data: two sources would share the name {next(n for n in names if names.count(n) > 1)!r}; "
                        "the name keys each source's metrics, so give them distinct file or folder names")
    return names


def read_sources(data: list[str], val_data: list[str], val_fraction: float) -> list[RowSource]:
    """The rows of each --data file, each split into training and held-out rows on its own (its
    --val_data, a val.jsonl beside it, or its first --val_fraction), so every source is evaluated."""
    if not data:
        raise UserError("--data names no file")
    if val_data and len(val_data) != len(data):
        raise UserError(f"--val_data gives {len(val_data)} files for {len(data)} --data files; give one per --data "
                        "file, in the same order, or none")
    names = source_names(data)
    return [RowSource(name, path, *read_split(path, val_data[k] if val_data else None, val_fraction))
            for k, (name, path) in enumerate(zip(names, data))]


def rows_digest(rows: list[tuple[str, dict]]) -> str:
    """A digest of the rows (as read, in order): what a resumed run must train on again."""
    digest = hashlib.sha256()
    for _, row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A row as a list of messages; a one-line UserError naming `where` (file and row) if malformed."""
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{where}: message {i} needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise UserError(f"{where}: message {i} has role {m['role']!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise UserError(f"{where}: message {i} content must be text")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no assistant message, so nothing to learn from")
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            raise UserError(f"{where}: empty assistant response")
        return messages
    missing = [k for k in ("prompt", "response") if row.get(k) is None]
    if missing:
        raise UserError(f"{where}: needs 'messages', or 'prompt' and 'response' (missing {', '.join(missing)})")
    for key in ("prompt", "response"):
        if not isinstance(row[key], str):
            raise UserError(f"{where}: '{key}' must be text, not {json.dumps(row[key], default=str)[:60]}")
    if not row["response"].strip():
        raise UserError(f"{where}: empty response")
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer the default template if it has none; returns whether it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:
        raise UserError(f"{where}: the chat template failed to render: {first_line(err)}")


def encode(tokenizer, messages: list[dict[str, str]], where: str, last_turn_only: bool = False) -> Example:
    """Token ids of a conversation and which of them are the assistant's responses (with
    last_turn_only, the final assistant turn's alone: earlier ones are context).

    The whole conversation is rendered and tokenised once, as generation would see it; the
    assistant spans are found by rendering incrementally (the prompt up to each answer with
    add_generation_prompt=True, then the prompt plus the answer), and tokens whose text starts
    inside a span are the response.
    """
    full = _render(tokenizer, messages, False, where)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:k], True, where)
        upto = _render(tokenizer, messages[: k + 1], False, where)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise UserError(f"{where}: the chat template does not render conversations incrementally "
                            "(a shorter conversation's text is not a prefix of a longer one's)")
        spans.append((len(head), len(upto)))
    if last_turn_only:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([start for start, _ in enc["offset_mapping"]], dtype=np.int64)
    is_response = np.zeros(len(starts), dtype=bool)
    for begin, end in spans:
        is_response |= (starts >= begin) & (starts < end)
    return Example(np.asarray(enc["input_ids"], dtype=np.int64), is_response)


@dataclass
class LengthReport:
    total: int
    dropped: int
    truncated: int

    def __str__(self) -> str:
        return f"{self.total} examples: {self.dropped} dropped, {self.truncated} truncated (too long)"


def fit_length(examples: list[Example], max_tokens: int, truncate: bool) -> tuple[list[Example], LengthReport]:
    """Apply the length policy: an example longer than `max_tokens` is dropped, or with `truncate`
    cut to its first `max_tokens` tokens if a response token remains among them."""
    kept, dropped, truncated = [], 0, 0
    for ex in examples:
        if len(ex.ids) <= max_tokens:
            kept.append(ex)
        elif truncate and ex.is_response[1:max_tokens].any():
            kept.append(Example(ex.ids[:max_tokens], ex.is_response[:max_tokens]))
            truncated += 1
        else:
            dropped += 1
    return kept, LengthReport(len(examples), dropped, truncated)


def apply_length_policy(items: list, seq_len: int, truncate: bool, say: Callable[[str], None],
                        fit: Callable = fit_length, noun: str = "example") -> list:
    """Keep the items that fit seq_len + 1 tokens (the last token is only a target) under the length
    policy, say what it did, and refuse data of which nothing fits. `fit` and `noun` serve pairs
    of sides too (preference data), where the limit holds per side."""
    limit = seq_len + 1
    kept, report = fit(items, limit, truncate)
    per_side = noun == "pair"
    say(f"  {str(report).replace('examples', noun + 's')} (limit {limit} tokens{' per side' if per_side else ''}; "
        f"policy: {'truncate' if truncate else 'drop'})")
    if not kept:
        raise UserError(f"every {noun} {'has a side longer' if per_side else 'is longer'} than {limit} tokens; raise "
                        "--seq_len or pass --truncate")
    return kept


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Group examples, in order, into rows of at most `seq_len` input positions.

    An example of n tokens takes n - 1 positions (its last token is only a target).
    """
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        if current and used + len(ex.ids) - 1 > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.ids) - 1
    if current:
        rows.append(current)
    return rows


class SFTSamples(Samples):
    """Fine-tuning samples for the training loop: `batch(indices)` -> (model inputs, targets).

    Unpacked, a sample is one example, padded to the longest in its batch with a 2-D
    attention mask. Packed, a sample is several examples in one row: positions restart at 0
    for each, and a 4-D block-diagonal causal mask stops attention at example boundaries.
    Targets are the next token where it is a response token, else -100, and never cross an
    example boundary, so neither attention nor loss leaks between packed examples.
    """

    def __init__(self, rows: list[list[Example]], pad_id: int, packed: bool, pad_multiple: int = 1,
                 max_width: int | None = None):
        self.rows = rows
        self.pad_id = pad_id
        self.packed = packed
        self.pad_multiple = pad_multiple
        self.max_width = max_width

    def __len__(self) -> int:
        return len(self.rows)

    def num_tokens(self, indices: np.ndarray) -> int:
        return sum(len(ex.ids) - 1 for i in indices for ex in self.rows[i])

    def num_targets(self, indices: np.ndarray) -> int:
        return sum(int(ex.is_response[1:].sum()) for i in indices for ex in self.rows[i])

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        # Each example contributes len-1 input positions (its last token has nothing to predict).
        width = max(sum(len(ex.ids) - 1 for ex in row) for row in rows)
        # Padded to a multiple, so batches come in a few shapes rather than one per length: on a
        # CPU every new shape left memory behind (peak 1208 -> 1929 MiB over 400 steps of the
        # demo at ZeRO-3, against 991 -> 1000 MiB in multiples of 64).
        width = -(-width // self.pad_multiple) * self.pad_multiple
        if self.max_width is not None:
            width = min(width, self.max_width)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        targets = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segment = torch.full((n, width), -1, dtype=torch.long)  # which example; -1 for padding
        for b, row in enumerate(rows):
            pos = 0
            for s, ex in enumerate(row):
                length = len(ex.ids) - 1
                ids = torch.from_numpy(ex.ids)
                input_ids[b, pos:pos + length] = ids[:-1]
                labels = torch.where(torch.from_numpy(ex.is_response[1:]), ids[1:], IGNORE)
                targets[b, pos:pos + length] = labels
                position_ids[b, pos:pos + length] = torch.arange(length)
                segment[b, pos:pos + length] = s
                pos += length
        if not self.packed:
            return {"input_ids": input_ids, "attention_mask": (segment >= 0).long()}, targets
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        mask = (same & causal)[:, None]  # (batch, 1, query, key): True where attention is allowed
        # Padding queries attend to themselves only, so no row of the mask is empty.
        mask |= torch.eye(width, dtype=torch.bool)[None, None]
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}, targets


class MixedSFT(SourceIndex, SFTSamples):
    """Several sources' fine-tuning samples as one index space, batched together (padded or packed
    alike), for a weighted mixture's order."""

    def __init__(self, parts: list[SFTSamples], names: list[str]):
        first = parts[0]
        SFTSamples.__init__(self, [row for part in parts for row in part.rows], first.pad_id, first.packed,
                            first.pad_multiple, first.max_width)
        self.index_sources([len(part) for part in parts], names)
