"""GPU-only training tests (run on the device machine: `python -m pytest tests/test_training_gpu.py -m gpu`).

FSDP2 (`strategy=fsdp`) on one GPU against the single-device run, with CPU offload, and on two GPUs: loss parity
with one GPU accumulating the same global batch, a killed sharded run resumed with `resume=auto`, and the
consolidated export. The same checks run on two CPU processes in tests/test_fsdp_cpu.py; here NCCL, bf16 and
CUDA placement are what is new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_fsdp_cpu import PRETRAIN, STEPS, TINY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REPO = Path(__file__).resolve().parents[1]
GPU = [a for a in TINY if a != "accelerator=cpu"] + ["accelerator=gpu", "stage=pretrain", *PRETRAIN,
                                                    "pretrain.limit_val_batches=1"]


def worker(out: Path, root: Path, *args: str, flags=()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tests.fsdp_worker", str(out), *flags, *GPU, *args, f"runs_root={root}",
               f"pretrain.data.cache_dir={root / 'cache'}"]
    # Not the rendezvous of an earlier in-process distributed test (its TCPStore still holds MASTER_PORT).
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
             "GROUP_RANK")


def record(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_fsdp_on_one_gpu_trains_like_the_single_device_run_and_offloads(tmp_path):
    from illada_lightning.checkpoint import load_checkpoint

    common = ["precision=bf16-mixed", "activation_checkpointing=true", "pretrain.batch_size=8"]
    single = worker(tmp_path / "a", tmp_path, *common, "name=single", "strategy=auto", "devices=1")
    assert single.returncode == 0, single.stderr[-4000:]
    sharded = worker(tmp_path / "b", tmp_path, *common, "name=fsdp1", "strategy=fsdp", "devices=1")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    a, b = record(tmp_path / "a")["record"]["pretrain"], record(tmp_path / "b")["record"]["pretrain"]
    # Same masks and data; bf16 compute differs in where the casts happen (autocast vs FSDP2's bf16 params).
    assert [v for _, v in b["losses"]] == pytest.approx([v for _, v in a["losses"]], rel=3e-2)
    ckpt = tmp_path / "fsdp1" / "pretrain" / "checkpoints" / f"step={STEPS:07d}.ckpt"
    assert (ckpt / ".metadata").is_file()
    model, _ = load_checkpoint(tmp_path / "fsdp1" / "pretrain" / "model.pt", device="cuda")
    assert next(model.parameters()).dtype == torch.float32  # the export keeps the fp32 master weights

    offload = worker(tmp_path / "c", tmp_path, *common, "name=offload", "strategy=fsdp", "devices=1",
                     "fsdp_cpu_offload=true")
    assert offload.returncode == 0, offload.stderr[-4000:]
    c = record(tmp_path / "c")["record"]["pretrain"]
    assert [v for _, v in c["losses"]] == pytest.approx([v for _, v in b["losses"]], rel=1e-3)  # same math


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_two_gpus_parity_resume_and_export(tmp_path):
    from illada_lightning.checkpoint import load_checkpoint
    from tests.fsdp_worker import probe_ids

    fp32 = ["precision=32-true", "matmul_precision=highest", "pretrain.batch_size=4"]
    one = worker(tmp_path / "one", tmp_path, *fp32, "name=one", "strategy=auto", "devices=1",
                 "pretrain.accumulate_grad_batches=2", "pretrain.limit_val_batches=2")
    assert one.returncode == 0, one.stderr[-4000:]
    two = worker(tmp_path / "two", tmp_path, *fp32, "name=two", "strategy=fsdp", "devices=2")
    assert two.returncode == 0, two.stderr[-4000:]
    single, sharded = record(tmp_path / "one")["record"]["pretrain"], record(tmp_path / "two")["record"]["pretrain"]
    per_step = [(single["losses"][i][1] + single["losses"][i + 1][1]) / 2 for i in range(0, 2 * STEPS, 2)]
    assert [v for _, v in sharded["losses"]] == pytest.approx(per_step, abs=1e-4)
    assert [v for _, v in sharded["grad_norms"]] == pytest.approx([v for _, v in single["grad_norms"]], rel=1e-4)

    killed = worker(tmp_path / "killed", tmp_path, *fp32, "name=cut", "strategy=fsdp", "devices=2",
                    flags=["--kill-at", "4"])
    assert killed.returncode != 0
    resumed = worker(tmp_path / "resumed", tmp_path, *fp32, "name=cut", "strategy=fsdp", "devices=2", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = record(tmp_path / "resumed")["record"]["pretrain"]
    assert [v for _, v in again["losses"]] == pytest.approx([v for _, v in sharded["losses"][3:]], abs=1e-5)

    model, tokenizer = load_checkpoint(tmp_path / "two" / "pretrain" / "model.pt", device="cuda")
    assert tokenizer is not None
    with torch.no_grad():
        logits = model(probe_ids(model.config.vocab_size).cuda()).float().cpu()
    torch.testing.assert_close(logits, torch.load(tmp_path / "two" / "logits.pt"), rtol=1e-4, atol=1e-4)
