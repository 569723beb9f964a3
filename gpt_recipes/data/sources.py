"""Where text comes from: local files, folders, globs, JSONL/Parquet, saved datasets, the hub.

Everything is loaded with `datasets` into one Dataset with a single "text" column, or, with
streaming, one IterableDataset that reads its sources as it goes (a hub dataset is then
never downloaded whole).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from gpt_recipes.errors import UserError, first_line, root_line

if TYPE_CHECKING:  # `datasets` takes about a second to import: only the functions that read data do
    import datasets

JSON_SUFFIXES = {".json", ".jsonl"}
PARQUET_SUFFIXES = {".parquet"}
# Suffixes that mark an input as a local file even if it does not exist (no hub lookup).
LOCAL_LOOKING_SUFFIXES = JSON_SUFFIXES | PARQUET_SUFFIXES | {".txt", ".md", ".py", ".rst", ".csv"}

# Parts of the standard library that are not prose or code people write: test suites,
# generated character tables and build configuration.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "__pycache__", "lib2to3"}


def default_corpus_files() -> list[Path]:
    """The Python standard library's own source, minus tests: real text on every machine that runs us."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata") or path.stat().st_size == 0:
            continue
        files.append(path)
    return files


NEWLINE = b"\n"


def check_utf8(path: Path, what: str) -> None:
    """That a JSON or text file is UTF-8 throughout, read in chunks: datasets' JSON reader accepts
    other bytes and fails only later, deep inside pyarrow, when a row is read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                start = max(0, min(err.start, len(chunk) - 1))
                bad_line = line + chunk[:start].count(NEWLINE)
                raise UserError(f"{what} {path} line {bad_line} is not UTF-8 text (byte {chunk[start]:#04x}); "
                                "save the file as UTF-8")
            line += chunk.count(NEWLINE)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} ends inside a UTF-8 character (the file is cut short or not UTF-8)")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (
        path / "state.json"
    ).is_file()


def _looks_like_hub_name(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and Path(spec).suffix.lower() not in LOCAL_LOOKING_SUFFIXES


def expand(inputs: Iterable[str], file_pattern: str) -> list[tuple[str, str]]:
    """Classify each input as ('files:KIND', path), ('saved', dir) or ('hub', name)."""
    out: list[tuple[str, str]] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                out.append(("saved", str(path)))
                continue
            files = sorted(p for p in path.rglob(file_pattern) if p.is_file() and p.stat().st_size)
            if not files:
                raise UserError(f"input folder {spec} holds no files matching {file_pattern!r} (see --file_pattern)")
            out.extend((f"files:{_kind(p)}", str(p)) for p in files)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"input file {spec} is empty")
            out.append((f"files:{_kind(path)}", str(path)))
        elif glob.has_magic(spec):
            files = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file() and p.stat().st_size)
            if not files:
                raise UserError(f"input glob {spec!r} matches no files")
            out.extend((f"files:{_kind(p)}", str(p)) for p in files)
        elif _looks_like_hub_name(spec):
            out.append(("hub", spec))
        else:
            raise UserError(f"input {spec} does not exist")
    return out


def fingerprint(expanded: list[tuple[str, str]], extra: dict) -> str:
    """A digest of the inputs (paths, sizes, mtimes) and options, to reuse prepared data."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for kind, spec in expanded:
        h.update(f"{kind}\0{spec}\0".encode())
        path = Path(spec)
        targets = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in targets:
            if p.exists():
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _text_column(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if ds.column_names is None:  # a stream whose fields show only as it is read
        def text_of(row: dict) -> dict:
            if text_field not in row:
                raise UserError(f"{where} has no field {text_field!r} (fields: {', '.join(row)}); see --text_field")
            if not isinstance(row[text_field], str):
                raise UserError(f"{where}: field {text_field!r} holds {type(row[text_field]).__name__}, not text; "
                                "see --text_field")
            return {"text": row[text_field]}
        return ds.map(text_of).select_columns(["text"])
    if text_field not in ds.column_names:
        raise UserError(f"{where} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); see --text_field")
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{where}: field {text_field!r} holds {getattr(feature, 'dtype', type(feature).__name__)}, "
                        "not text; see --text_field")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _load_saved(path: str, split: str, streaming: bool) -> datasets.Dataset:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"saved dataset {path} has no split {split!r} (splits: {', '.join(loaded)}); see --split")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


def _load_hub(name: str, split: str, streaming: bool) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown name, no such split: all user-fixable
        raise UserError(f"input {name} is not a local path, and loading it from the hub failed: {first_line(err)}")


def load_texts(expanded: list[tuple[str, str]], text_field: str = "text", split: str = "train",
               streaming: bool = False, stream_hub: bool = True) -> datasets.Dataset | datasets.IterableDataset:
    """Load all inputs into one Dataset with a "text" column (one row per document), in a fixed order.

    With `streaming`, an IterableDataset that holds nothing whole in memory or in a cache: local
    files are read one at a time, saved datasets from their own files, and hub datasets as a
    stream, or, unless `stream_hub`, downloaded whole first and read from the download.
    """
    import datasets

    parts: list[datasets.Dataset] = []
    by_kind: dict[str, list[str]] = {}
    for kind, spec in expanded:
        if kind.startswith("files:"):
            by_kind.setdefault(kind.split(":", 1)[1], []).append(spec)
        elif kind == "saved":
            parts.append(_text_column(_load_saved(spec, split, streaming), text_field, f"saved dataset {spec}"))
        else:
            hub = _load_hub(spec, split, streaming and stream_hub)
            if streaming and not stream_hub:
                hub = hub.to_iterable_dataset()
            parts.append(_text_column(hub, text_field, f"hub dataset {spec}"))
    for kind, files in by_kind.items():
        try:
            if kind == "text":
                # One document per file, so EOS separates files, not lines.
                ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                           streaming=streaming)
            else:
                ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"could not read {kind} input ({files[0]}{' ...' if len(files) > 1 else ''}): {root_line(err)}")
        parts.append(_text_column(ds, "text" if kind == "text" else text_field, f"{kind} input {files[0]}"))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if streaming:
        return ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True)
    ds = ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True, desc="Dropping empty documents")
    if len(ds) == 0:
        raise UserError("the inputs hold no non-empty documents")
    return ds


def read_batches(ds, batch_size: int):
    """Batches of a (streamed) Dataset. A stream reads its files only now, so a file that is not
    text (a binary among the inputs) fails here: one line naming the cause, not a traceback."""
    try:
        yield from ds.iter(batch_size=batch_size)
    except UserError:
        raise
    except (UnicodeDecodeError, ValueError, OSError) as err:
        raise UserError(f"could not read the inputs: {root_line(err)}; pick text files with --file_pattern")
