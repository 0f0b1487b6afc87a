"""SFT records and both layouts: iLLaDA whole_window (§2.2) and LLaDA response_only (§2.3, B.1)."""

import json
import logging

import numpy as np
import pytest
import torch

from illada_lightning.data.config import SFTDataConfig
from illada_lightning.data.corpus import DataFileError
from illada_lightning.data.datamodule import SFTDataModule
from illada_lightning.data.sft import (
    SFTExamples,
    collate_response_only,
    example_stream_documents,
    load_sft_examples,
    read_sft_pairs,
    response_only_rows,
    truncate_example,
)
from illada_lightning.data.stream import pack_documents
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator
from illada_lightning.model.attention import check_cu_seqlens

RECORDS = [
    {"prompt": "What is 2 + 3?", "response": "5"},
    {"prompt": "Tom has 3 apples and buys 5 more. How many apples does Tom have?", "response": "8"},
    {"messages": [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 4 + 4?"}, {"role": "assistant", "content": "8"},
        {"role": "user", "content": "Now add 2 to that."}, {"role": "assistant", "content": "10"},
        {"role": "user", "content": "And take away 1."}, {"role": "assistant", "content": "9"},
    ]},
    {"prompt": "What is 10 - 7?", "response": "3"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(r) for r in RECORDS] * 20 + ["What is How many apples does have Now add to that"] * 20
    return train_tokenizer_from_iterator(texts, vocab_size=330)


@pytest.fixture()
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_pairs_and_multi_turn_split(tok, sft_file):
    pairs = read_sft_pairs([sft_file], tok, multi_turn_split=True)
    assert len(pairs) == 2 + 3 + 1  # the 3-turn dialogue gives 3 single-turn pairs (LLaDA B.1)
    assert pairs[0] == ("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n", "5")
    sys_ = "<|system|>\nAnswer with a number.\n"
    assert pairs[2] == (sys_ + "<|user|>\nWhat is 4 + 4?\n<|assistant|>\n", "8")
    assert pairs[3] == (sys_ + "<|user|>\nWhat is 4 + 4?\n<|assistant|>\n8\n<|user|>\nNow add 2 to that.\n<|assistant|>\n",
                        "10")
    assert pairs[4][0].startswith(pairs[3][0] + "10\n<|user|>\nAnd take away 1.") and pairs[4][1] == "9"
    # without the split, a dialogue is one example: its whole history, then the last answer
    single = read_sft_pairs([sft_file], tok, multi_turn_split=False)
    assert len(single) == 4 and single[2] == pairs[4]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": "b"', r"sft.jsonl:2: malformed JSON"),
    ('{"prompt": "a"}', r"sft.jsonl:2: record has no field 'response'"),
    ('{"prompt": "a", "response": 3}', r"sft.jsonl:2: record has a non-string field 'response'"),
    ('{"messages": []}', r"sft.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"sft.jsonl:2: the last message must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', r"sft.jsonl:2: messages\[0\] must be an object"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', r"sft.jsonl:2: the dialogue has no user message"),
])
def test_bad_records_name_file_and_line(tok, tmp_path, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + line + "\n")
    with pytest.raises(DataFileError, match=message):
        read_sft_pairs([path], tok, multi_turn_split=True)


def test_missing_sft_file(tok, tmp_path):
    with pytest.raises(DataFileError, match="data file not found: .*absent.jsonl"):
        load_sft_examples([tmp_path / "absent.jsonl"], tok, multi_turn_split=True, cache_dir=None)


def test_whole_window_stream_order_and_one_eos_per_example(tok, sft_file):
    ex = load_sft_examples([sft_file], tok, multi_turn_split=False, cache_dir=None)
    docs = example_stream_documents(ex, tok.eos_id)
    rows = pack_documents(docs, 16, eos_id=tok.eos_id, pad_id=tok.pad_id, append_eos=False)
    stream = np.concatenate([rows.tokens[r, : rows.n_real[r]] for r in range(len(rows))])
    assert int((stream == tok.eos_id).sum()) == len(RECORDS)  # exactly one EOS per example, none elsewhere
    text = tok.decode(stream, skip_special_tokens=False)
    pairs = read_sft_pairs([sft_file], tok, multi_turn_split=False)
    assert text == "".join(p + r + "<|eos|>" for p, r in pairs)  # prompt + response + EOS, in file order


def test_whole_window_per_example_segments_end_at_eos(tok, sft_file, tmp_path):
    cfg = SFTDataConfig(train_files=[str(sft_file)], val_files=[], masking="whole_window", p_split=0.0,
                        attention="per_example", cache_dir=str(tmp_path / "c"))
    dm = SFTDataModule(cfg, tok, max_seq_len=16, batch_size=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader())
    n_full = 0
    for b in batches:
        B, L = b["input_ids"].shape
        assert L == 16
        check_cu_seqlens(b["cu_seqlens"], B, L)
        if b["loss_mask"] is None:
            n_full += 1
        else:  # only the stream's padded last row has a mask, and it only hides padding
            assert (b["input_ids"][~b["loss_mask"]] == tok.pad_id).all()
    assert n_full >= len(batches) - 1
    # every example's segment boundary is in cu_seqlens: the token after each EOS starts a segment
    for b in batches:
        flat = b["input_ids"].reshape(-1)
        cu = set(b["cu_seqlens"].tolist())
        ends = (flat == tok.eos_id).nonzero().flatten() + 1
        assert all(int(e) in cu for e in ends)


def eos_followers_in_segment(batch, eos_id):
    """Tokens that follow an EOS inside the same attention segment."""
    flat, cu = batch["input_ids"].reshape(-1), set(batch["cu_seqlens"].tolist())
    return [int(flat[e + 1]) for e in (flat == eos_id).nonzero().flatten().tolist()
            if e + 1 < flat.numel() and e + 1 not in cu]


@pytest.mark.parametrize("p_split", [0.0, 1.0])
def test_whole_window_attention_runs_across_examples(tok, sft_file, tmp_path, p_split):
    """iLLaDA §2.2, one continuous corpus: EOS is followed by the next example's prompt in one segment."""
    cfg = SFTDataConfig(train_files=[str(sft_file)], val_files=[], masking="whole_window", p_split=p_split,
                        cache_dir=str(tmp_path / "c"))
    assert cfg.attention == "window"  # the default for whole_window
    dm = SFTDataModule(cfg, tok, max_seq_len=24, batch_size=2)
    loader = dm.train_dataloader()
    batches = list(loader) + list(loader)  # two epochs: two different cuts of the stream
    prompt_starts = {tok.token_to_id("<|user|>"), tok.token_to_id("<|system|>")}
    followers = [t for b in batches for t in eos_followers_in_segment(b, tok.eos_id)]
    assert followers and set(followers) <= prompt_starts
    for b in batches:
        B, L = b["input_ids"].shape
        check_cu_seqlens(b["cu_seqlens"], B, L)
        n_segments = len(b["cu_seqlens"]) - 1
        # one segment per window, two when the random-length split fires (p_split=1: always)
        assert n_segments == B * (2 if p_split == 1.0 else 1)
    per_example = SFTDataModule(SFTDataConfig(train_files=[str(sft_file)], val_files=[], attention="per_example",
                                              p_split=p_split, cache_dir=str(tmp_path / "c")), tok, 24, 2)
    assert all(not eos_followers_in_segment(b, tok.eos_id) for b in per_example.train_dataloader())


def test_response_only_masks_and_padding(tok):
    ex = SFTExamples([np.array([10, 11, 12], np.int32), np.array([20], np.int32)],
                     [np.array([30], np.int32), np.array([40, 41, 42, 43], np.int32)])
    rows, plens = response_only_rows(ex, 64, tok.eos_id)
    batch = collate_response_only(rows, plens, tok.eos_id)
    E = tok.eos_id
    assert batch["input_ids"].tolist() == [[10, 11, 12, 30, E, E], [20, 40, 41, 42, 43, E]]  # EOS-padded to longest
    assert batch["loss_mask"].tolist() == [[False] * 3 + [True] * 3, [False] + [True] * 5]
    assert batch["cu_seqlens"].tolist() == [0, 6, 12] and batch["max_seqlen"] == 6
    check_cu_seqlens(batch["cu_seqlens"], 2, 6)


def test_response_only_datamodule_prompt_visible(tok, sft_file, tmp_path):
    cfg = SFTDataConfig(train_files=[str(sft_file)], val_files=[str(sft_file)], masking="response_only",
                        cache_dir=str(tmp_path / "c"))
    dm = SFTDataModule(cfg, tok, max_seq_len=128, batch_size=3)
    batches = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 6  # multi-turn split: 2 + 3 + 1 pairs
    asst = tok.token_to_id("<|assistant|>")
    for b in batches:
        ids, mask = b["input_ids"], b["loss_mask"]
        for r in range(ids.shape[0]):
            first = int(mask[r].nonzero()[0])
            assert not mask[r, :first].any() and mask[r, first:].all()
            # the visible part is the prompt: it ends with the assistant marker and "\n"
            assert asst in ids[r, :first].tolist() and asst not in ids[r, first:].tolist()
            assert ids[r, -1] == tok.eos_id
        # a row's own length ends at its first EOS; everything after it is EOS padding, and the batch is as
        # wide as its longest row
        lengths = [int((row == tok.eos_id).nonzero()[0]) + 1 for row in ids]
        assert all((row[n:] == tok.eos_id).all() for row, n in zip(ids, lengths))
        assert ids.shape[1] == max(lengths)


def test_truncation_logged_and_all_too_long_errors(tok, caplog):
    ex = SFTExamples([np.arange(10, 20, dtype=np.int32), np.array([5], np.int32)],
                     [np.arange(30, 50, dtype=np.int32), np.array([6], np.int32)])
    with caplog.at_level(logging.WARNING, logger="illada_lightning.data.sft"):
        rows, plens = response_only_rows(ex, 16, tok.eos_id)
    assert "1 of 2 SFT examples are longer than max_seq_len=16: truncated" in caplog.text
    assert len(rows[0]) == 16 and tok.eos_id not in rows[0].tolist()  # a cut answer does not end with EOS
    assert plens[0] == 8 and rows[0][:8].tolist() == list(range(12, 20))  # prompt keeps its end, half the row
    assert rows[1].tolist() == [5, 6, tok.eos_id]
    with pytest.raises(ValueError, match="every one of the 2 SFT examples is longer than max_seq_len=2"):
        response_only_rows(ex, 2, tok.eos_id)


def test_truncate_example_keeps_short_answer_whole():
    p, a = truncate_example(np.arange(100), np.array([7, 8, 2]), 10)
    assert p.tolist() == list(range(93, 100)) and a.tolist() == [7, 8, 2]


def test_sft_config_validation():
    with pytest.raises(ValueError, match="sft.masking"):
        SFTDataConfig(masking="prompt").validate()
    with pytest.raises(ValueError, match="sft.p_split"):
        SFTDataConfig(p_split=-0.1).validate()
    with pytest.raises(ValueError, match="sft.attention: 'document' is not one of"):
        SFTDataConfig(attention="document").validate()


def test_batches_are_tensors_of_contract_types(tok, sft_file, tmp_path):
    for masking in ("whole_window", "response_only"):
        cfg = SFTDataConfig(train_files=[str(sft_file)], val_files=[], masking=masking, cache_dir=str(tmp_path))
        b = next(iter(SFTDataModule(cfg, tok, max_seq_len=32, batch_size=2).train_dataloader()))
        assert b["input_ids"].dtype == torch.long and b["cu_seqlens"].dtype == torch.int32
        assert isinstance(b["max_seqlen"], int)
        assert b["loss_mask"] is None or b["loss_mask"].dtype == torch.bool
