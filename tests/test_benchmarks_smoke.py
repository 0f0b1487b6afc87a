"""CPU smoke runs of the benchmark scripts, so they cannot rot (the real numbers come from the GPU)."""

import json

import pytest

from benchmarks import sampler_bench, scoring_bench, train_throughput


def test_train_throughput_smoke_writes_a_json_line(tmp_path):
    out = tmp_path / "tp.jsonl"
    for extra in ([], ["--padded"]):
        r = train_throughput.main(["--preset", "tiny", "--device", "cpu", "--seq-len", "64", "--batch-size", "2",
                                   "--steps", "2", "--warmup", "1", "--out", str(out), *extra])
        assert r["tokens_per_s"] > 0 and r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["model_tflops_per_s"] > 0 and r["mfu"] is None  # no GPU: no measured matmul peak
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["packing"] for r in rows] == [True, False]


def test_train_throughput_lora_smoke_trains_fp32_adapters_on_a_bf16_base(tmp_path):
    from illada_lightning.model.config import get_preset
    from illada_lightning.model.lora import adapted_parameter_counts
    from illada_lightning.model.lora_config import LoraConfig

    r = train_throughput.main(["--preset", "tiny", "--device", "cpu", "--seq-len", "64", "--batch-size", "2",
                               "--steps", "2", "--warmup", "1", "--precision", "bf16-true", "--lora-rank", "4",
                               "--out", str(tmp_path / "lora.jsonl")])
    assert r["lora_rank"] == 4 and r["precision"] == "bf16-true" and r["tokens_per_s"] > 0
    counts = adapted_parameter_counts(get_preset("tiny"), LoraConfig(rank=4))
    assert (r["trainable_params"], r["total_params"]) == (counts["trainable_params"], counts["total_params"])
    assert r["param_dtypes"] == {"trainable": ["float32"], "frozen": ["bfloat16"]}


def test_padded_baseline_counts_only_real_tokens():
    args = train_throughput.parse_args(["--preset", "tiny", "--seq-len", "8192", "--batch-size", "2", "--padded"])
    from illada_lightning.model.config import get_preset

    batch = train_throughput.make_batches(args, get_preset("tiny"), 1)[0]
    lengths = train_throughput.useful_lengths(batch)
    assert batch["loss_mask"] is not None  # documents shorter than the row: padded
    assert sum(lengths) == int(batch["loss_mask"].sum()) and len(lengths) == 2


def test_sampler_and_scoring_benchmarks_smoke(tmp_path):
    assert sampler_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "s.jsonl")])
    assert scoring_bench.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "c.jsonl")])


@pytest.mark.slow
def test_train_throughput_through_the_strategy_factory_with_two_processes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--preset", "tiny", "--device", "cpu", "--seq-len", "64",
         "--batch-size", "2", "--steps", "2", "--warmup", "1", "--strategy", "ddp", "--devices", "2",
         "--out", str(out)],
        cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]  # rank 0 alone writes
    assert row["strategy"] == "ddp" and row["world_size"] == 2 and row["tokens_per_s"] > 0


def test_eos_placement_counts_the_block_where_generation_stopped():
    from benchmarks.sft_eos_placement import accuracy_with_stderr, eos_placement

    # reference answers of 2 tokens, blocks of 4, budget 8: EOS belongs in block 0
    generated = [[5, 6], [5, 6, 7, 8, 9], [5] * 8, [5, 6, 7]]
    stats = eos_placement(generated, [2, 2, 2, 2], block_length=4, max_new_tokens=8)
    assert stats["eos_in_first_right_block"] == 0.5  # the 2nd stopped a block late, the 3rd never stopped
    assert stats["tokens_past_answer"] == (0 + 3 + 6 + 1) / 4
    assert accuracy_with_stderr([True, False, True, True]) == (0.75, (0.75 * 0.25 / 4) ** 0.5)


def test_scaling_model_shards_state_and_exposes_communication_across_nodes():
    from benchmarks.scaling_model import main

    rows = main(["--gpus", "1", "8", "64", "--rows-per-gpu", "1", "--inter-gbps", "25"])
    one, node, many = rows
    assert one["comm_s"] == 0 and one["states_gb"] == 8 * node["states_gb"]  # 16 B/param over W ranks
    assert node["scaling_efficiency"] == 1.0 and many["scaling_efficiency"] < 0.6  # NVLink hides it, 25 GB/s does not
    assert many["tokens_per_s"] > node["tokens_per_s"]
@pytest.mark.slow
def test_fast_decoding_benchmarks_smoke(tmp_path):
    """`--fast` rows carry the fields issue 17 asks for; the exact row is its own baseline."""
    out = tmp_path / "fast.jsonl"
    rows = sampler_bench.main(["--preset", "tiny", "--device", "cpu", "--fast", "--batch-size", "2", "--gen-length",
                               "4", "--steps", "4", "--block-length", "2", "--out", str(out)])
    rows += scoring_bench.main(["--preset", "tiny", "--device", "cpu", "--fast", "--questions", "2", "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(rows) == 6 + 4
    for r in written:
        assert {"bench", "preset", "cache", "parallel", "threshold", "tokens_per_s", "speedup_vs_exact",
                "token_agreement", "device"} <= set(r)
        assert r["tokens_per_s"] > 0
    exact = [r for r in written if r["cache"] == "none" and r["parallel"] == "off"]
    assert len(exact) == 2 and all(r["speedup_vs_exact"] == 1.0 for r in exact)
    assert exact[0]["token_agreement"] == 1.0 and exact[1]["scores_identical"]


def test_train_throughput_levers_record_losses_and_tabulate(tmp_path, capsys):
    """The issue-23 options reach the module (deferred check, checkpointing plan, chunk size) and the rows carry
    what round3_table compares: the first losses, equal for the same seed and numerics."""
    from benchmarks import round3_table

    out = tmp_path / "mfu.jsonl"
    common = ["--preset", "tiny", "--device", "cpu", "--seq-len", "64", "--batch-size", "2", "--steps", "2",
              "--warmup", "1", "--record-losses", "3", "--out", str(out)]
    base = train_throughput.main([*common, "--label", "base"])
    lever = train_throughput.main([*common, "--label", "lever", "--nan-check", "deferred", "--activation-checkpointing",
                                   "1", "--loss-chunk-size", "16"])
    assert len(base["losses"]) == 3 and lever["nan_check"] == "deferred" and lever["activation_checkpointing"] == "1"
    assert lever["losses"] == pytest.approx(base["losses"], rel=1e-5)  # same seed, data and masks; same math
    round3_table.main([str(tmp_path)])
    table = capsys.readouterr().out
    assert "base" in table and "lever" in table and "ref" in table
