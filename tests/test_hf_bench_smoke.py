"""benchmarks/hf_checkpoint_bench.py on CPU with the tiny preset: write, load in a child process, score cloze."""

import json

import pytest

from benchmarks import hf_checkpoint_bench
from benchmarks.hf_checkpoint_bench import corpus_text


@pytest.mark.slow
def test_hf_checkpoint_bench_smoke_writes_a_json_line(tmp_path):
    # The likelihood rule only: on a loaded 2-core box the confidence rule's 12 sequential forwards dominate.
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_text(None))  # seeded synthetic text: the test never reads /work/shared
    out = tmp_path / "hf.jsonl"
    rows = hf_checkpoint_bench.main(["--preset", "tiny", "--device", "cpu", "--items", "2", "--mc-samples", "2",
                                     "--rules", "likelihood",
                                     "--text", str(text), "--dir", str(tmp_path / "ckpt"), "--out", str(out)])
    assert [r["rule"] for r in rows] == ["likelihood"]
    assert all(r["items"] == 2 and r["items_per_s"] > 0 and r["load_s"] > 0 and r["write_s"] > 0 for r in rows)
    assert rows[0]["host_peak_rss_gb"] >= rows[0]["host_rss_before_load_gb"] > 0
    assert [json.loads(line)["rule"] for line in out.read_text().splitlines()] == ["likelihood"]
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
