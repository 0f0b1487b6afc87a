"""Packed rows, the batch `cu_seqlens`, and random-length splits (pure functions).

Rows are windows cut from the continuous stream of documents (`stream.py` cuts them), each document followed by
`<|eos|>`. Unlike a plain concatenation, every row keeps its document boundaries and the batch's `cu_seqlens`
carries them, so tokens never attend across documents (iLLaDA §2.1: variable-length examples packed and
separated by cumulative offsets, no padding); a document that straddles a row end continues as its own segment
at the start of the next row. A row cut at the stream's end is padded with `pad_id`: the padding is its own
segment and has `loss_mask` False.

Random-length training (iLLaDA §2.1, after Nie et al. 2024): with probability `p_split` a row is split at a
uniformly random interior point of its real tokens into two segments, i.e. one more boundary in `cu_seqlens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedRows:
    """`n_rows` rows of `max_seq_len` tokens with their document boundaries."""

    tokens: np.ndarray  # int32 [n_rows, max_seq_len], padded with pad_id after n_real
    n_real: np.ndarray  # int64 [n_rows], tokens before the padding
    starts: list[np.ndarray]  # per row: sorted offsets (0 < s < n_real) where a new document starts
    n_long_docs: int = 0  # documents (with their EOS) longer than max_seq_len, spread over several rows

    def __len__(self) -> int:
        return self.tokens.shape[0]


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
