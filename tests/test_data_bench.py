"""Smoke run of the data benchmark on a tiny corpus, so the script cannot rot (real numbers: benchmarks/NOTES.md)."""

import json

import numpy as np
import pytest

from benchmarks import data_bench

WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings sing of apples and pears".split()


@pytest.mark.slow
def test_data_bench_writes_json_lines(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "source.txt"
    source.write_text("\n\n".join(" ".join(rng.choice(WORDS, size=30)) for _ in range(300)) + "\n")
    out = tmp_path / "data.jsonl"
    rows = data_bench.main(["--files", str(source), "--work", str(tmp_path / "work"), "--real-tokens", "20000",
                            "--total-tokens", "60000", "--vocab-size", "300", "--window", "64", "--batch-size", "2",
                            "--batches", "5", "--workers", "0", "--num-proc", "1", "--out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == rows and [r["kind"] for r in rows] == ["prepare", "loader", "loader"]
    assert all(r["bench"] == "data" and r["corpus_tokens"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[2]["corpus_tokens"] == rows[2]["repeated_times"] * rows[0]["corpus_tokens"]
    assert all(r["loader_tokens_per_s"] > 0 and r["workers"] == 0 for r in rows[1:])
