"""Read corpora into `datasets.Dataset`s of documents and tokenise them once, with a cache.

Sources: local text, jsonl and parquet files, or a `datasets` hub name (online use only; tests never go
online).

What a document is in a text file (`text_unit`):
- ``paragraph``: a blank line separates documents. Prose paragraphs and a play's speaker turns (the shipped
  Shakespeare corpus) are self-contained units of a few dozen to a few hundred tokens, which suits the
  short rows of the small presets; newlines inside a paragraph are kept.
- ``wikitext``: WikiText's ` = Title = ` top-level headings start a new article (` = = Section = = `
  headings stay inside it): one document per article.
- ``file``: the whole file is one document.
- ``auto`` (default): ``wikitext`` when the file has a top-level ` = Title = ` heading line, else
  ``paragraph``.

Every reader raises a clear error naming the file (and the line, for jsonl) on a missing or empty file, a
malformed record or a record without the text field; jsonl is validated here, line by line, before any
library sees it, so the message is ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
              ".parquet": "parquet"}
WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
CACHE_VERSION = "1"  # bump when the tokenised format changes


def _datasets():
    """The `datasets` package, imported on first use (seconds): configs and file checks do not need it."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


class DataFileError(ValueError):
    """A data file is missing, empty or malformed; the message names the file (and line)."""


def resolve_data_path(path: str | Path) -> Path:
    """A relative path is looked up in the working directory, then in the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


def check_data_file(path: str | Path) -> Path:
    p = resolve_data_path(path)
    if not p.is_file():
        raise DataFileError(f"data file not found: {path}" + (f" (also looked in {REPO_ROOT})" if p == Path(path)
                                                             and not p.is_absolute() else ""))
    if p.stat().st_size == 0:
        raise DataFileError(f"data file is empty: {p}")
    return p


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataFileError(f"cannot tell the format of {path} from its extension {suffix!r}; "
                            f"set data.format to one of text, jsonl, parquet")
    return EXTENSIONS[suffix]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- text ----------------------------------------------------------------------------------------------


def split_text_documents(text: str, text_unit: str = "auto") -> list[str]:
    """Cut a text file into documents (see the module doc); empty documents are dropped."""
    lines = text.splitlines()
    if text_unit == "auto":
        text_unit = "wikitext" if any(WIKITEXT_TITLE.match(line) for line in lines) else "paragraph"
    if text_unit == "file":
        docs = [text]
    elif text_unit == "paragraph":
        docs = re.split(r"\n[ \t]*\n", text)
    elif text_unit == "wikitext":
        docs, current = [], []
        for line in lines:
            if WIKITEXT_TITLE.match(line) and current:
                docs.append("\n".join(current))
                current = []
            current.append(line)
        docs.append("\n".join(current))
    else:
        raise ValueError(f"unknown text_unit {text_unit!r}")
    return [d.strip() for d in docs if d.strip()]


def read_text_documents(path: str | Path, text_unit: str = "auto") -> list[str]:
    p = check_data_file(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{p}: not UTF-8 text ({exc})") from None
    docs = split_text_documents(text, text_unit)
    if not docs:
        raise DataFileError(f"data file has no text (only whitespace): {p}")
    return docs


# --- jsonl ---------------------------------------------------------------------------------------------


def read_jsonl_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; malformed JSON or a non-object -> file:line error."""
    p = check_data_file(path)
    records = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataFileError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise DataFileError(f"data file has no records (only blank lines): {p}")
    return records


def read_jsonl_texts(path: str | Path, text_field: str = "text") -> list[str]:
    texts = []
    for lineno, record in read_jsonl_records(path):
        value = record.get(text_field)
        if not isinstance(value, str):
            problem = "has no field" if text_field not in record else "has a non-string field"
            raise DataFileError(f"{path}:{lineno}: record {problem} {text_field!r} (keys: {sorted(record)})")
        texts.append(value)
    return texts


# --- parquet -------------------------------------------------------------------------------------------


def read_parquet_texts(path: str | Path, text_field: str = "text") -> list[str]:
    p = check_data_file(path)
    try:
        ds = _datasets().Dataset.from_parquet(str(p), keep_in_memory=True)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataFileError(f"{p}: cannot read as parquet ({exc})") from None
    if text_field not in ds.column_names:
        raise DataFileError(f"{p}: no column {text_field!r} (columns: {ds.column_names})")
    texts = ds[text_field]
    for row, value in enumerate(texts):
        if not isinstance(value, str):
            raise DataFileError(f"{p}: row {row}: column {text_field!r} is {type(value).__name__}, not a string")
    return texts


# --- documents and tokenisation ------------------------------------------------------------------------


def read_documents(
    files: Sequence[str | Path], fmt: str = "auto", text_field: str = "text", text_unit: str = "auto"
) -> datasets.Dataset:
    """A Dataset with one `text` column: every document of every file, in order."""
    if not files:
        raise DataFileError("no data files given")
    texts: list[str] = []
    for path in files:
        kind = detect_format(path, fmt)
        if kind == "text":
            texts += read_text_documents(path, text_unit)
        elif kind == "jsonl":
            texts += read_jsonl_texts(path, text_field)
        elif kind == "parquet":
            texts += read_parquet_texts(path, text_field)
        else:
            raise DataFileError(f"unknown data format {kind!r} for {path}")
    return _datasets().Dataset.from_dict({"text": texts})


def read_hub_documents(hub_name: str, split: str, text_field: str = "text") -> datasets.Dataset:
    """Documents of a `datasets` hub data set (needs the network unless already cached)."""
    ds = _datasets().load_dataset(hub_name, split=split)
    if text_field not in ds.column_names:
        raise DataFileError(f"hub data set {hub_name} ({split}): no column {text_field!r} (columns: {ds.column_names})")
    ds = ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")


def tokenize_dataset(
    ds: datasets.Dataset, tokenizer, columns: Sequence[str], cache_file: Path | None = None
) -> datasets.Dataset:
    """Tokenise `columns` (each into `<column>_ids`) with one batched `Dataset.map`, written to `cache_file`."""

    def encode(batch):
        return {f"{c}_ids": tokenizer.encode_batch(batch[c]) for c in columns}

    kwargs = {}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(cache_file)}
    return ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, **kwargs)


def column_to_arrays(ds: datasets.Dataset, column: str) -> list[np.ndarray]:
    """A list-of-ints column as int32 arrays, straight from the Arrow buffers (no Python lists)."""
    col = ds.data.column(column).combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = col.offsets.to_numpy()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join((CACHE_VERSION, *parts)).encode("utf-8")).hexdigest()[:24]


def load_tokenized_documents(
    files: Sequence[str | Path],
    tokenizer,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    text_unit: str = "auto",
    hub_name: str | None = None,
    hub_split: str = "train",
    cache_dir: str | Path | None = ".cache/illada",
) -> list[np.ndarray]:
    """Token ids (int32 arrays) of every document, tokenised once and cached, all in memory. Training reads
    prepared shards instead (`prepare.py`, `prepared.py`); this is their plain in-memory twin in the tests.

    The cache entry is keyed by the files' content hashes, the reading options and the tokenizer's
    fingerprint, so editing a file or retraining the tokenizer never serves stale tokens.
    """
    if hub_name is not None:
        source = f"hub:{hub_name}:{hub_split}"
        ds = read_hub_documents(hub_name, hub_split, text_field)
    else:
        paths = [check_data_file(f) for f in files]
        source = "|".join(file_hash(p) for p in paths)
        ds = None
    key = cache_key(source, fmt, text_field, text_unit, tokenizer.fingerprint())
    cache_file = Path(cache_dir) / f"tokens-{key}.arrow" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        log.info("tokenised corpus from cache %s", cache_file)
        tokens = _datasets().Dataset.from_file(str(cache_file))
    else:
        if ds is None:
            ds = read_documents(files, fmt, text_field, text_unit)
        tokens = tokenize_dataset(ds, tokenizer, ["text"], cache_file)
    return column_to_arrays(tokens, "text_ids")
