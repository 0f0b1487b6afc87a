"""FSDP2 and inference mode (the crash of the first validation on GPUs, reproduced on CPU).

A sharded model gathered under `torch.inference_mode` gets inference tensors as its unsharded parameters:
the forward fails ("Inference tensors do not track version counter"), or a later training step does. On
GPUs Lightning's evaluation loops ran validation under inference mode; on CPU its gloo exemption hid it.
Each check runs in a fresh process (a process group per test), see tests/fsdp_inference_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _worker(*args: str, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "tests.fsdp_inference_worker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("param_dtype", ["bf16", "fp32"])
def test_generating_through_a_sharded_model_then_training_works(param_dtype):
    out = _worker("sampler", param_dtype, port=29561 + (param_dtype == "bf16"))
    assert "error" not in out, out["error"]
    assert out == {"generated": 4, "grad": True}


def test_fsdp_validation_before_and_during_training_as_under_nccl(tmp_path):
    out = _worker("trainer", str(tmp_path), port=29563)
    assert "error" not in out, out["error"]
    assert out["global_step"] == 3
    assert out["initial_val_loss"] > 0 and out["val_loss"] > 0
