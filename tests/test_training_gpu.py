"""GPU-only training tests (run through the device machine): FSDP over two GPUs with sharded checkpoints
that resume and load, and a bf16 single-GPU run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_run_experiment import REPO, SMALL

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.run", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_two_gpus_sharded_checkpoint_resumes_and_loads(tmp_path):
    from illada_lightning.training.checkpoint import load_checkpoint

    cache = tmp_path / "cache"
    args = [*SMALL, f"runs_root={tmp_path}", f"pretrain.data.cache_dir={cache}", f"sft.data.cache_dir={cache}",
            "strategy=fsdp", "devices=2", "accelerator=gpu", "precision=bf16-mixed", "activation_checkpointing=true",
            "stage=pretrain", "pretrain.max_steps=6", "pretrain.ckpt_every_n_steps=3", "mlflow.enabled=false",
            "pretrain.val_every_n_steps=0"]
    full = run_cli(tmp_path, *args, "name=full")
    assert full.returncode == 0, full.stderr[-4000:]
    ckpt_dir = tmp_path / "full" / "pretrain" / "checkpoints"
    final = ckpt_dir / "step=0000006.ckpt"
    assert final.is_dir() and (final / ".metadata").is_file()  # sharded (torch.distributed.checkpoint)
    summary = json.loads((tmp_path / "full" / "pretrain" / "FINISHED").read_text())

    # Resume from the sharded step-3 checkpoint: same final validation bound as the uninterrupted run.
    cut = tmp_path / "cut" / "pretrain" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(ckpt_dir / "step=0000003.ckpt", cut / "step=0000003.ckpt")
    (cut / "last.ckpt").symlink_to("step=0000003.ckpt")
    shutil.copytree(tmp_path / "full" / "tokenizer", tmp_path / "cut" / "tokenizer")
    resumed = run_cli(tmp_path, *args, "name=cut", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again = json.loads((tmp_path / "cut" / "pretrain" / "FINISHED").read_text())
    assert again["global_step"] == 6
    assert again["val_loss"] == pytest.approx(summary["val_loss"], rel=2e-2)  # bf16 + collectives: close, not exact

    model, tokenizer = load_checkpoint(final)  # consolidates the shards
    exported, _ = load_checkpoint(tmp_path / "full" / "pretrain" / "model.pt")
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert tokenizer is not None
