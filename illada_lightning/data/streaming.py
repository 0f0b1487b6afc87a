"""Training straight from a streamed data set (`datasets` streaming): nothing downloaded or prepared first.

`stream_documents` opens a hub data set by name, or local files through a `datasets` builder ("parquet",
"json", "text" with `data_files`: the same code, which is how the tests run it offline), and gives this rank
its share (`datasets.distributed.split_dataset_by_node`: whole files per rank when their count divides by the
world size, else every world_size-th record), so ranks read disjoint documents.

`StreamingLoader` tokenises the rank's documents as they arrive and cuts consecutive windows of `window`
tokens from them, documents isolated by `cu_seqlens` and the random-length split applied as for the prepared
corpus. A stream is read in order, so each pass (epoch) starts its windows after a random number of tokens in
[0, window) drawn from (seed, epoch): the cut points move every epoch. Its state is (epoch, batches trained on);
resume reads the stream again and skips that many batches, which is exact because tokenisation and the cut
are deterministic, and independent of worker counts (batches are built in the training process). A stream has
no length, so Lightning's fetcher takes one batch ahead of the step; the datamodule reports every batch the
trainer actually takes (`consume`), and the saved position counts those, not the ones yielded. Resident
memory: one tokenised batch of documents plus the windows of one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from illada_lightning.data.corpus import DataFileError
from illada_lightning.data.loader import seeded_generator
from illada_lightning.data.packing import PackedRows, collate_packed_rows
from illada_lightning.data.prepared import with_eos
from illada_lightning.data.stream import epoch_offset

ENCODE_BATCH = 256  # documents tokenised per call


def stream_documents(source: str, split: str, text_field: str = "text", *, data_files=None, rank: int = 0,
                     world_size: int = 1) -> datasets.IterableDataset:
    """This rank's documents of a streamed data set, as an IterableDataset with one `text` column."""
    try:
        ds = datasets.load_dataset(source, data_files=data_files, split=split, streaming=True)
    except Exception as exc:  # hub, network and builder errors come in many types
        raise DataFileError(f"cannot stream {source!r} ({split}): {exc}") from None
    if ds.column_names is not None and text_field not in ds.column_names:
        raise DataFileError(f"streamed data set {source!r} ({split}): no column {text_field!r} "
                            f"(columns: {ds.column_names})")
    if world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds


def streamed_token_batches(docs: datasets.IterableDataset, tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat ids, offsets from 0) per batch of non-empty documents, tokenised as they arrive."""
    for batch in docs.iter(batch_size=ENCODE_BATCH):
        ids = tokenizer.encode_batch([t for t in batch["text"] if t and t.strip()])
        if not ids:
            continue
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(lengths.sum()))
        yield flat, np.concatenate([[0], np.cumsum(lengths)])


def stream_windows(batches, window: int, skip: int, eos_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive windows (tokens, document starts inside) of the token stream (every document followed by
    EOS), after its first `skip` tokens; the tail shorter than a window is dropped."""
    pending, starts = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    for flat, offsets in batches:
        ids, doc_starts = with_eos(flat, offsets, eos_id, np.dtype(np.int32))
        starts = np.concatenate([starts, doc_starts + len(pending)])
        pending = np.concatenate([pending, ids])
        if skip:
            cut = min(skip, len(pending))
            pending, starts, skip = pending[cut:], starts[starts >= cut] - cut, skip - cut
        while len(pending) >= window:
            yield pending[:window], starts[(starts > 0) & (starts < window)]
            pending, starts = pending[window:], starts[starts >= window] - window


class StreamingLoader:
    """Training batches of windows from `open_stream()` (a fresh IterableDataset of this rank's documents)."""

    def __init__(self, open_stream, tokenizer, window: int, batch_size: int, *, p_split: float, seed: int):
        self.open_stream, self.tokenizer, self.window = open_stream, tokenizer, window
        self.batch_size, self.p_split, self.seed = batch_size, p_split, seed
        self.epoch, self.position = 0, 0  # position: batches yielded in `epoch`
        self._ahead = 0  # batches yielded but not yet taken by the trainer (counted once `consume` is called)
        self._reported = False
        self._last_epoch_len = 0

    def _batches(self, epoch: int) -> Iterator[dict]:
        skip = epoch_offset(self.seed, epoch, self.window)
        batches = streamed_token_batches(self.open_stream(), self.tokenizer)
        windows = stream_windows(batches, self.window, skip, self.tokenizer.eos_id)
        group, index = [], 0
        for tokens, starts in windows:
            group.append((tokens, starts))
            if len(group) == self.batch_size:
                yield self._collate(group, epoch, index)
                group, index = [], index + 1

    def _collate(self, group, epoch: int, index: int) -> dict:
        rows = PackedRows(np.stack([t for t, _ in group]), np.full(len(group), self.window, dtype=np.int64),
                          [s for _, s in group])
        generator = seeded_generator(self.seed, epoch, index) if self.p_split > 0 else None
        return collate_packed_rows(rows, np.arange(len(group)), p_split=self.p_split, generator=generator)

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = self.epoch, self.position
        for i, batch in enumerate(self._batches(epoch)):
            if i < skip:
                continue
            self.position = i + 1
            self._ahead += 1
            yield batch
        self.epoch, self.position, self._last_epoch_len = epoch + 1, 0, self.position

    def consume(self) -> None:
        """The trainer took one more batch for a step (called from the datamodule's batch hook)."""
        self._ahead, self._reported = self._ahead - 1, True

    def state_dict(self) -> dict[str, Any]:
        epoch, position, ahead = self.epoch, self.position, max(self._ahead, 0) if self._reported else 0
        if ahead > position:  # the batches still ahead of the trainer end the previous epoch
            epoch, position = epoch - 1, self._last_epoch_len - (ahead - position)
        else:
            position -= ahead
        return {"epoch": epoch, "position": position, "seed": self.seed, "batch_size": self.batch_size,
                "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "window"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the streaming loader: checkpoint has {key}={state[key]}, "
                                 f"this run has {key}={getattr(self, key)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._ahead, self._reported = 0, False
