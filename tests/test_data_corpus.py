"""Corpus reading (text, jsonl, parquet), bad files, tokenisation cache."""

import json

import datasets
import numpy as np
import pytest

from illada_lightning.data.corpus import (
    DataFileError,
    load_tokenized_documents,
    read_documents,
    resolve_data_path,
    split_text_documents,
)
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator

DOCS = ["First doc, line one.\nLine two.", "Second doc.", "Third: what is 2 + 2?"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer_from_iterator(DOCS * 10, vocab_size=320)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_paragraphs(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\n".join(DOCS) + "\n\n  \n\n")
    assert read_documents([p])["text"] == DOCS


def test_text_wikitext_articles_split_at_top_level_headings():
    text = (" = Alpha = \n\n Alpha is a letter . \n\n = = History = = \n\n Old . \n\n"
            " = Beta = \n\n Beta follows . \n")
    docs = split_text_documents(text)  # auto-detects the ` = Title = ` headings
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = History = =" in docs[0] and "Old ." in docs[0]
    assert docs[1].startswith("= Beta =") and "Beta follows" in docs[1]
    assert split_text_documents("a\n\nb", "file") == ["a\n\nb"]


def test_jsonl_and_parquet(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    pq = tmp_path / "b.parquet"
    datasets.Dataset.from_dict({"body": DOCS[::-1]}).to_parquet(str(pq))
    assert read_documents([j])["text"] == DOCS
    assert read_documents([pq], text_field="body")["text"] == DOCS[::-1]
    # several files of one format are concatenated in order
    assert read_documents([j, j])["text"] == DOCS + DOCS


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataFileError, match="data file not found: .*nope.txt"):
        read_documents([tmp_path / "nope.txt"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFileError, match="data file is empty: .*empty.jsonl"):
        read_documents([empty])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\n")
    with pytest.raises(DataFileError, match="no text .*blank.txt"):
        read_documents([blank])
    with pytest.raises(DataFileError, match="extension '.csv'"):
        (tmp_path / "x.csv").write_text("a")
        read_documents([tmp_path / "x.csv"])


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "ok too"}\n{"text": broken}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:4: malformed JSON"):
        read_documents([p])
    p.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: expected a JSON object"):
        read_documents([p])


def test_record_without_field_reports_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"text": "b"}, {"content": "c"}])
    with pytest.raises(DataFileError, match=r"f.jsonl:3: record has no field 'text'"):
        read_documents([p])
    p = write_jsonl(tmp_path / "g.jsonl", [{"text": 5}])
    with pytest.raises(DataFileError, match=r"g.jsonl:1: record has a non-string field 'text'"):
        read_documents([p])
    pq = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(pq))
    with pytest.raises(DataFileError, match=r"c.parquet: no column 'text'"):
        read_documents([pq])


def test_tokenised_once_and_cached(tmp_path, tok):
    p = tmp_path / "a.txt"
    p.write_text("\n\n".join(DOCS))
    cache = tmp_path / "cache"
    first = load_tokenized_documents([p], tok, cache_dir=cache)
    assert [tok.decode(d) for d in first] == DOCS
    assert all(d.dtype == np.int32 for d in first)
    files = sorted(cache.glob("tokens-*.arrow"))
    assert len(files) == 1
    second = load_tokenized_documents([p], tok, cache_dir=cache)
    assert [d.tolist() for d in second] == [d.tolist() for d in first]
    assert sorted(cache.glob("tokens-*.arrow")) == files  # served from the cache
    p.write_text("\n\n".join(DOCS[:2]))  # edited file: new key, no stale tokens
    assert len(load_tokenized_documents([p], tok, cache_dir=cache)) == 2
    assert len(list(cache.glob("tokens-*.arrow"))) == 2


def test_relative_paths_fall_back_to_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/corpus/train.txt").is_file()
