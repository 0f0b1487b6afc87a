"""Packing documents into fixed-length rows, the batch `cu_seqlens`, and random-length splits (pure functions).

Rows are cut from the continuous stream of documents, each followed by `<|eos|>`: LLaDA B.1 "concatenate the
collected documents and segment the text into fixed-length sequences", and iLLaDA §2.2 samples 8192-token
sequences from the continuous corpus. Unlike a plain concatenation, every row keeps its document boundaries
and the batch's `cu_seqlens` carries them, so tokens never attend across documents (iLLaDA §2.1: variable-length
examples packed and separated by cumulative offsets, no padding). A document that straddles a row end continues
as its own segment at the start of the next row; one longer than `max_seq_len` spans several rows (counted and
logged, never dropped). Only the stream's last row can be short: it is padded with `pad_id`, the padding is its
own segment and has `loss_mask` False.

Random-length training (iLLaDA §2.1, after Nie et al. 2024): with probability `p_split` a row is split at a
uniformly random interior point of its real tokens into two segments, i.e. one more boundary in `cu_seqlens`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class PackedRows:
    """`n_rows` rows of `max_seq_len` tokens with their document boundaries."""

    tokens: np.ndarray  # int32 [n_rows, max_seq_len], padded with pad_id after n_real
    n_real: np.ndarray  # int64 [n_rows], tokens before the padding
    starts: list[np.ndarray]  # per row: sorted offsets (0 < s < n_real) where a new document starts
    n_long_docs: int = 0  # documents (with their EOS) longer than max_seq_len, spread over several rows

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_documents(
    docs: Sequence[Sequence[int]], max_seq_len: int, *, eos_id: int, pad_id: int, append_eos: bool = True
) -> PackedRows:
    """Concatenate documents (each followed by EOS unless `append_eos` is False) and cut rows of `max_seq_len`."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    pieces, lengths = [], []
    eos = np.array([eos_id], dtype=np.int32)
    for doc in docs:
        arr = np.asarray(doc, dtype=np.int32)
        if arr.size == 0 and not append_eos:
            continue
        pieces += [arr, eos] if append_eos else [arr]
        lengths.append(arr.size + int(append_eos))
    if not lengths:
        raise ValueError("no tokens to pack (every document is empty)")
    stream = np.concatenate(pieces)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n_long = int(sum(n > max_seq_len for n in lengths))
    if n_long:
        log.info("%d of %d documents are longer than max_seq_len=%d: split across rows (not dropped)",
                 n_long, len(lengths), max_seq_len)

    n_rows = -(-stream.size // max_seq_len)
    tokens = np.full(n_rows * max_seq_len, pad_id, dtype=np.int32)
    tokens[: stream.size] = stream
    row_begin = np.arange(n_rows, dtype=np.int64) * max_seq_len
    n_real = np.minimum(stream.size - row_begin, max_seq_len)
    # Documents starting strictly inside each row (a start at offset 0 is the row boundary itself).
    lo = np.searchsorted(doc_starts, row_begin, side="right")
    hi = np.searchsorted(doc_starts, row_begin + n_real, side="left")
    starts = [doc_starts[a:b] - r for a, b, r in zip(lo, hi, row_begin)]
    return PackedRows(tokens.reshape(n_rows, max_seq_len), n_real, starts, n_long)


def random_split_points(
    n_real: Sequence[int], p_split: float, generator: torch.Generator
) -> list[int | None]:
    """Per row: None (kept whole, probability 1 - p_split) or a split offset uniform in [1, n_real - 1]."""
    n = len(n_real)
    split = torch.rand(n, generator=generator) < p_split
    u = torch.rand(n, generator=generator)
    points: list[int | None] = []
    for i, length in enumerate(n_real):
        length = int(length)
        if bool(split[i]) and length >= 2:
            points.append(1 + min(int(u[i] * (length - 1)), length - 2))
        else:
            points.append(None)
    return points


def row_segments(starts: Sequence[int], n_real: int, row_len: int, extra: int | None = None) -> list[int]:
    """Segment ends of one row (offsets in (0, row_len]): document starts, the optional random split point,
    the end of the real tokens and, if the row is padded, the padding as one more segment."""
    cuts = set(int(s) for s in starts)
    if extra is not None:
        cuts.add(int(extra))
    ends = sorted(c for c in cuts if 0 < c < n_real)
    ends.append(int(n_real))
    if n_real < row_len:
        ends.append(row_len)
    return ends


def build_cu_seqlens(row_ends: Sequence[Sequence[int]], row_len: int) -> tuple[torch.Tensor, int]:
    """`cu_seqlens` (int32) over the flattened `[B, row_len]` batch, and `max_seqlen` as a Python int."""
    cu = [0]
    for r, ends in enumerate(row_ends):
        cu += [r * row_len + e for e in ends]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    max_seqlen = int((cu_t[1:] - cu_t[:-1]).max()) if len(cu) > 1 else 0
    return cu_t, max_seqlen


def collate_packed_rows(
    rows: PackedRows, indices: Sequence[int], *, p_split: float = 0.0, generator: torch.Generator | None = None
) -> dict:
    """The contract batch for rows `indices`: input_ids, cu_seqlens, max_seqlen, loss_mask (None unless padded)."""
    idx = np.asarray(indices, dtype=np.int64)
    row_len = rows.tokens.shape[1]
    n_real = rows.n_real[idx]
    if p_split > 0.0:
        if generator is None:
            raise ValueError("a random-length split (p_split > 0) needs a seeded generator")
        points = random_split_points(n_real, p_split, generator)
    else:
        points = [None] * len(idx)
    ends = [row_segments(rows.starts[i], int(n), row_len, pt) for i, n, pt in zip(idx, n_real, points)]
    cu_seqlens, max_seqlen = build_cu_seqlens(ends, row_len)
    input_ids = torch.from_numpy(rows.tokens[idx].astype(np.int64))
    loss_mask = None
    if bool((n_real < row_len).any()):
        loss_mask = torch.arange(row_len)[None, :] < torch.from_numpy(n_real)[:, None]
    return {"input_ids": input_ids, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "loss_mask": loss_mask}
