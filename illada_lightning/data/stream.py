"""The token stream that training windows are cut from (in memory or on disk), and each epoch's windows.

A stream is a corpus as one flat sequence of token ids, every document followed by its EOS (pretraining) or
every formatted example ending with its EOS (SFT), plus the offsets where documents start. It is a list of
shards, each a flat token array with its document offsets: `MemoryShard` holds numpy arrays (the shipped tiny
corpus, SFT sets); `prepared.DiskShard` reads a prepared corpus's files and holds only what it was asked for.
Every shard starts with a document, so a shard boundary is a document boundary.

Windows (LLaDA B.1 "segment the text into fixed-length sequences"; iLLaDA §2.2 "sample 8192-token training
sequences from this corpus"): epoch e's training windows start at `(offset_e + k * L) mod N`, k = 0..n-1 with
n = N // L, and `offset_e` uniform in [0, N) drawn from (seed, epoch). So every epoch cuts the stream at new
points, the same ones for a given seed and epoch (resume is exact), n is fixed (Lightning and the resume check
need a fixed epoch length), the last window wraps around to the stream's start, and the < L tokens left out
differ from epoch to epoch. A stream shorter than one window gives one padded window. Validation windows are
fixed: offset 0, no wrap, the last one padded (`fixed_rows`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from illada_lightning.data.loader import batch_seed
from illada_lightning.data.packing import PackedRows

log = logging.getLogger(__name__)

OFFSET_TAG = 0x0FF5E7  # keeps the epoch-offset seed apart from the epoch-order seed batch_seed(seed, epoch)


class MemoryShard:
    """A flat token array and the sorted offsets (starting with 0) where its documents start."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray):
        self.tokens, self.doc_starts = tokens, np.asarray(doc_starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.tokens[lo:hi]

    def starts_in(self, lo: int, hi: int) -> np.ndarray:
        """Document starts s with lo <= s < hi."""
        ds = self.doc_starts
        return ds[np.searchsorted(ds, lo, "left") : np.searchsorted(ds, hi, "left")]


class TokenStream:
    """Shards seen as one stream of `n_tokens` tokens."""

    def __init__(self, shards: Sequence):
        self.shards = list(shards)
        self.bounds = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)
        self.n_tokens = int(self.bounds[-1])
        if self.n_tokens == 0:
            raise ValueError("no tokens in the stream (every document is empty)")

    @classmethod
    def from_documents(cls, docs: Sequence[Sequence[int]], eos_id: int | None = None) -> TokenStream:
        """Documents in order, each followed by `eos_id` unless it is None (SFT examples carry their own)."""
        eos = [np.array([eos_id], dtype=np.int32)] if eos_id is not None else []
        pieces, lengths = [], []
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int32)
            if arr.size == 0 and eos_id is None:
                continue
            pieces += [arr, *eos]
            lengths.append(arr.size + len(eos))
        if not lengths:
            raise ValueError("no tokens to pack (every document is empty)")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls([MemoryShard(np.concatenate(pieces), starts)])

    def document_lengths(self) -> np.ndarray:
        """Length of every document (for logging and checks; reads every shard's offsets)."""
        ends = [np.append(s.starts_in(0, len(s)), len(s)) + b for s, b in zip(self.shards, self.bounds)]
        return np.concatenate([np.diff(e) for e in ends])

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [lo, hi) of the stream and the document starts inside, relative to lo (0 included)."""
        tokens, starts = [], []
        k = int(np.searchsorted(self.bounds, lo, "right")) - 1
        while lo < hi:
            base, shard = int(self.bounds[k]), self.shards[k]
            stop = min(hi, int(self.bounds[k + 1]))
            tokens.append(np.asarray(shard.read(lo - base, stop - base)))
            starts.append(shard.starts_in(lo - base, stop - base) + base)
            lo, k = stop, k + 1
        return np.concatenate(tokens), np.concatenate(starts)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`length` tokens from `start`, wrapping to the stream's start; document starts relative to `start`."""
        end = start + length
        tokens, starts = self.read(start, min(end, self.n_tokens))
        starts = starts - start
        if end > self.n_tokens:  # wrap: the stream's start is a document start
            more, more_starts = self.read(0, end - self.n_tokens)
            tokens = np.concatenate([tokens, more])
            starts = np.concatenate([starts, more_starts + (self.n_tokens - start)])
        return tokens, starts


# --- windows -------------------------------------------------------------------------------------------


def n_train_windows(n_tokens: int, window: int) -> int:
    return max(n_tokens // window, 1)


def n_fixed_windows(n_tokens: int, window: int) -> int:
    return -(-n_tokens // window)


def epoch_offset(seed: int, epoch: int, n_tokens: int) -> int:
    """Where epoch `epoch`'s windows start: uniform in [0, n_tokens), a pure function of (seed, epoch)."""
    return int(np.random.default_rng(batch_seed(seed, epoch, OFFSET_TAG)).integers(n_tokens))


def train_window_starts(items: np.ndarray, seed: int, epoch: int, n_tokens: int, window: int) -> np.ndarray:
    """Stream offsets of training windows `items` in epoch `epoch` (see the module doc)."""
    if n_tokens < window:  # one padded window
        return np.zeros(len(items), dtype=np.int64)
    offset = epoch_offset(seed, epoch, n_tokens)
    return (offset + np.asarray(items, dtype=np.int64) * window) % n_tokens


def window_rows(stream: TokenStream, starts: Sequence[int], window: int, *, pad_id: int, wrap: bool,
                isolate_documents: bool = True) -> PackedRows:
    """Rows of `window` tokens starting at `starts`; without `wrap` a row stops at the stream's end and is padded.
    With `isolate_documents` False no document start is a boundary (the row is one attention segment, up to
    the random-length split)."""
    tokens = np.full((len(starts), window), pad_id, dtype=np.int32)
    n_real = np.zeros(len(starts), dtype=np.int64)
    row_starts = []
    for r, s in enumerate(starts):
        n = window if wrap and stream.n_tokens >= window else min(window, stream.n_tokens - int(s))
        ids, doc_starts = stream.window(int(s), n)
        tokens[r, :n], n_real[r] = ids, n
        row_starts.append(doc_starts[doc_starts > 0] if isolate_documents else np.zeros(0, dtype=np.int64))
    return PackedRows(tokens, n_real, row_starts)


def fixed_rows(stream: TokenStream, window: int, *, pad_id: int, isolate_documents: bool = True) -> PackedRows:
    """All fixed windows (offset 0, the last one padded): validation rows and `pack_documents`."""
    starts = np.arange(n_fixed_windows(stream.n_tokens, window), dtype=np.int64) * window
    return window_rows(stream, starts, window, pad_id=pad_id, wrap=False, isolate_documents=isolate_documents)


def pack_documents(
    docs: Sequence[Sequence[int]], max_seq_len: int, *, eos_id: int, pad_id: int, append_eos: bool = True
) -> PackedRows:
    """Concatenate documents (each followed by EOS unless `append_eos` is False) and cut the fixed rows of
    `max_seq_len`; a document longer than a row spans several rows (counted and logged, never dropped)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    stream = TokenStream.from_documents(docs, eos_id if append_eos else None)
    lengths = stream.document_lengths()
    rows = fixed_rows(stream, max_seq_len, pad_id=pad_id)
    rows.n_long_docs = int((lengths > max_seq_len).sum())
    if rows.n_long_docs:
        log.info("%d of %d documents are longer than max_seq_len=%d: split across rows (not dropped)",
                 rows.n_long_docs, len(lengths), max_seq_len)
    return rows
