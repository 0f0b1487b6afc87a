"""Prepare a tokenized corpus on disk (`prepared.py` layout) from local files or a streamed hub data set.

Local files (text, jsonl, parquet) are read one at a time with the corpus readers (`corpus.read_documents`,
so documents are cut exactly as in memory) and tokenised with `datasets.Dataset.map(num_proc=...)` into a
temporary Arrow file, then copied into the shards batch by batch: memory holds one source file's text, never
the corpus's tokens. A hub data set is read through `datasets` streaming (`streaming.stream_documents`), so
nothing is downloaded before tokenisation starts; `tokenizers` batch-encodes it on all cores.

    prepare_corpus("corpora/wiki", tokenizer, files=["a.txt", "b.jsonl"], num_proc=8)

Re-running with the same sources (SHA-256), options and tokenizer is a no-op; a directory that holds a
different preparation is refused (nothing is overwritten).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from illada_lightning.data.corpus import DataFileError, read_documents
from illada_lightning.data.prepared import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    MANIFEST,
    file_sources,
    read_manifest,
    same_preparation,
    write_corpus,
)
from illada_lightning.data.streaming import stream_documents, streamed_token_batches

log = logging.getLogger(__name__)

ENCODE_BATCH = 1000  # documents per tokenizer call
WRITE_BATCH = 16384  # documents per shard write


def arrow_batches(table, column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat ids, offsets from 0) of a list column, `WRITE_BATCH` documents at a time, from the Arrow buffers."""
    for batch in table.to_batches(max_chunksize=WRITE_BATCH):
        col = batch.column(batch.schema.get_field_index(column))
        offsets = col.offsets.to_numpy()
        yield col.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def tokenized_file_batches(files, tokenizer, *, fmt, text_field, text_unit, num_proc, tmp_dir):
    """Every file's documents tokenised in `num_proc` processes, as (flat ids, offsets) batches."""
    for k, path in enumerate(files):
        ds = read_documents([path], fmt, text_field, text_unit)
        ds = ds.filter(lambda texts: [bool(t.strip()) for t in texts], input_columns="text", batched=True)
        procs = min(num_proc, max(len(ds) // ENCODE_BATCH, 1))
        tokens = ds.map(lambda batch: {"ids": tokenizer.encode_batch(batch["text"])}, batched=True,
                        batch_size=ENCODE_BATCH, num_proc=procs if procs > 1 else None, remove_columns=["text"],
                        cache_file_name=str(Path(tmp_dir) / f"tokens-{k}.arrow"), new_fingerprint=f"prepare-{k}")
        yield from arrow_batches(tokens.data.table, "ids")
        del tokens, ds


def prepare_corpus(
    out_dir: str | Path,
    tokenizer,
    *,
    files: Sequence[str | Path] = (),
    hub_name: str | None = None,
    hub_split: str = "train",
    hub_data_files: Sequence[str | Path] | None = None,
    fmt: str = "auto",
    text_field: str = "text",
    text_unit: str = "auto",
    num_proc: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Tokenise `files` (or the hub data set `hub_name`) into `out_dir`; returns the manifest (see module doc).
    `hub_data_files` streams local files through a `datasets` builder named by `hub_name` ("parquet", "json")."""
    out = Path(out_dir)
    if hub_name is None and not files:
        raise DataFileError("nothing to prepare: give data files or a hub name")
    if hub_name is None:
        sources = file_sources(files)
    else:
        sources = [{"hub": hub_name, "split": hub_split, "data_files": [str(f) for f in hub_data_files or []]}]
    wanted = {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint(), "sources": sources,
              "options": {"format": fmt, "text_field": text_field, "text_unit": text_unit}}
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if same_preparation(manifest, wanted):
            log.info("%s: already prepared (%d documents, %d tokens)", out, manifest["documents"], manifest["tokens"])
            return manifest
        raise DataFileError(f"{out / MANIFEST}: {out} holds a corpus prepared from other sources, options or "
                            "tokenizer; choose another output directory or delete it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataFileError(f"{out} exists and is not a prepared corpus (no {MANIFEST}); choose another directory")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="illada-prepare-") as tmp_dir:
        if hub_name is not None:
            data_files = [str(f) for f in hub_data_files] if hub_data_files else None
            docs = stream_documents(hub_name, hub_split, text_field, data_files=data_files)
            batches = streamed_token_batches(docs, tokenizer)
        else:
            batches = tokenized_file_batches(list(files), tokenizer, fmt=fmt, text_field=text_field,
                                             text_unit=text_unit, num_proc=num_proc, tmp_dir=tmp_dir)
        manifest = write_corpus(out, wanted, batches, tokenizer, shard_tokens)
    seconds = time.perf_counter() - began
    log.info("%s: prepared %d documents, %d tokens in %d shards, %.1fs (%.0f tokens/s)", out, manifest["documents"],
             manifest["tokens"], len(manifest["shards"]), seconds, manifest["tokens"] / max(seconds, 1e-9))
    return manifest
