"""Packing into rows, cu_seqlens, long documents, random-length splits (iLLaDA §2.1)."""

import logging
import math

import numpy as np
import pytest
import torch

from illada_lightning.data.packing import collate_packed_rows, random_split_points
from illada_lightning.data.stream import pack_documents
from illada_lightning.model.attention import check_cu_seqlens

EOS, PAD = 2, 0


def random_docs(n, seed, lo=1, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 100, size=rng.integers(lo, hi)).astype(np.int32) for _ in range(n)]


def segments(batch):
    """Per segment: (row, start, end) in row coordinates."""
    L = batch["input_ids"].shape[1]
    cu = batch["cu_seqlens"].tolist()
    return [(a // L, a % L, a % L + (b - a)) for a, b in zip(cu[:-1], cu[1:])]


def test_every_token_kept_in_order_with_one_eos_per_doc():
    docs = random_docs(50, 0)
    rows = pack_documents(docs, 16, eos_id=EOS, pad_id=PAD)
    assert rows.tokens.shape == (len(rows), 16)
    stream = np.concatenate([rows.tokens[r, : rows.n_real[r]] for r in range(len(rows))])
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    np.testing.assert_array_equal(stream, expected)
    assert (rows.n_real[:-1] == 16).all()  # only the last row can be short
    assert (rows.tokens[-1, rows.n_real[-1]:] == PAD).all()


def test_segments_are_documents_and_cu_seqlens_valid():
    docs = random_docs(30, 1)
    rows = pack_documents(docs, 24, eos_id=EOS, pad_id=PAD)
    batch = collate_packed_rows(rows, np.arange(len(rows)))
    B, L = batch["input_ids"].shape
    check_cu_seqlens(batch["cu_seqlens"], B, L)
    assert batch["cu_seqlens"].dtype == torch.int32
    lengths = batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]
    assert isinstance(batch["max_seqlen"], int) and batch["max_seqlen"] == int(lengths.max())
    # Walk the documents through the segments: each document is one segment, or a few consecutive ones when
    # it crosses row ends; a segment never holds tokens of two documents.
    flat = batch["input_ids"].reshape(-1)
    segs = [flat[a:b].tolist() for a, b in zip(batch["cu_seqlens"][:-1].tolist(), batch["cu_seqlens"][1:].tolist())]
    pad_segment = segs.pop()  # the last row's padding
    assert set(pad_segment) == {PAD}
    rebuilt, current = [], []
    for seg in segs:
        current += seg
        if seg[-1] == EOS:
            rebuilt.append(current[:-1])
            current = []
    assert rebuilt == [d.tolist() for d in docs]
    assert batch["loss_mask"] is not None
    assert batch["loss_mask"].sum() == sum(len(d) + 1 for d in docs)
    assert not batch["loss_mask"].reshape(-1)[flat == PAD].any()


def test_full_rows_have_no_loss_mask():
    docs = [np.arange(10, 25, dtype=np.int32)]  # 15 tokens + EOS = 16 = 2 rows of 8
    rows = pack_documents(docs, 8, eos_id=EOS, pad_id=PAD)
    batch = collate_packed_rows(rows, [0, 1])
    assert batch["loss_mask"] is None
    assert batch["cu_seqlens"].tolist() == [0, 8, 16]


def test_long_document_split_across_rows_not_dropped(caplog):
    docs = [np.arange(10, 60, dtype=np.int32), np.array([7, 8], dtype=np.int32)]  # 51 tokens at L=16
    with caplog.at_level(logging.INFO, logger="illada_lightning.data.stream"):
        rows = pack_documents(docs, 16, eos_id=EOS, pad_id=PAD)
    assert rows.n_long_docs == 1
    assert "1 of 2 documents are longer than max_seq_len=16" in caplog.text
    assert len(rows) == math.ceil((51 + 3) / 16)
    assert rows.tokens.reshape(-1)[:51].tolist() == list(range(10, 60)) + [EOS]
    assert [s.tolist() for s in rows.starts] == [[], [], [], [3]]  # doc 2 starts at offset 3 of row 3


def test_random_split_adds_one_interior_boundary():
    rows = pack_documents([np.arange(10, 10 + 8 * 64 - 1, dtype=np.int32)], 64, eos_id=EOS, pad_id=PAD)
    assert all(s.size == 0 for s in rows.starts)  # one document per row: any extra segment is a split
    gen = torch.Generator().manual_seed(0)
    batch = collate_packed_rows(rows, np.arange(8), p_split=1.0, generator=gen)
    check_cu_seqlens(batch["cu_seqlens"], 8, 64)
    segs = segments(batch)
    assert len(segs) == 16
    for r in range(8):
        (_, a0, b0), (_, a1, b1) = [s for s in segs if s[0] == r]
        assert a0 == 0 and b0 == a1 and 1 <= b0 <= 63 and b1 == 64
    assert batch["max_seqlen"] == max(b - a for _, a, b in segs)
    unsplit = collate_packed_rows(rows, np.arange(8), p_split=0.0)
    assert unsplit["cu_seqlens"].tolist() == list(range(0, 9 * 64, 64))


def test_split_frequency_close_to_p_split():
    p, n = 0.3, 4000
    points = random_split_points([256] * n, p, torch.Generator().manual_seed(1))
    n_split = sum(pt is not None for pt in points)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(n_split - n * p) < 4 * sigma, n_split
    chosen = np.array([pt for pt in points if pt is not None])
    assert chosen.min() >= 1 and chosen.max() <= 255
    # uniform on 1..255: mean 128, sd 73.6; the sample mean of ~1200 is within 4 standard errors
    assert abs(chosen.mean() - 128) < 4 * 73.6 / math.sqrt(chosen.size)
    assert sum(pt is not None for pt in random_split_points([256] * n, 0.0, torch.Generator())) == 0


def test_split_frequency_through_collate():
    p, L = 0.3, 32
    rows = pack_documents([np.arange(10, 10 + 600 * L - 1, dtype=np.int32) % 90 + 10], L, eos_id=EOS, pad_id=PAD)
    gen = torch.Generator().manual_seed(3)
    n_split = 0
    for start in range(0, 600, 50):
        batch = collate_packed_rows(rows, np.arange(start, start + 50), p_split=p, generator=gen)
        n_split += len(batch["cu_seqlens"]) - 1 - 50
    sigma = math.sqrt(600 * p * (1 - p))
    assert abs(n_split - 600 * p) < 4 * sigma


def test_split_is_seeded():
    rows = pack_documents(random_docs(40, 2), 32, eos_id=EOS, pad_id=PAD)
    idx = np.arange(len(rows) - 1)

    def cu(seed):
        return collate_packed_rows(rows, idx, p_split=0.5, generator=torch.Generator().manual_seed(seed))["cu_seqlens"]

    assert torch.equal(cu(5), cu(5))
    assert not torch.equal(cu(5), cu(6))
    with pytest.raises(ValueError, match="seeded generator"):
        collate_packed_rows(rows, idx, p_split=0.5)


def test_split_never_cuts_into_padding():
    rows = pack_documents([np.arange(10, 19, dtype=np.int32)], 32, eos_id=EOS, pad_id=PAD)  # 10 real tokens
    for seed in range(20):
        batch = collate_packed_rows(rows, [0], p_split=1.0, generator=torch.Generator().manual_seed(seed))
        cu = batch["cu_seqlens"].tolist()
        assert len(cu) == 4 and 1 <= cu[1] <= 9 and cu[2:] == [10, 32]


def test_empty_input_errors():
    with pytest.raises(ValueError, match="no tokens to pack"):
        pack_documents([], 16, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="max_seq_len must be >= 2"):
        pack_documents([[5]], 1, eos_id=EOS, pad_id=PAD)
