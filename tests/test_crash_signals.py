"""Crash drills with real signals in a subprocess (issue 14, items 2 and 5).

SIGTERM and SIGINT save a checkpoint at the interrupted step, mark the MLflow runs KILLED, print how to
resume and exit non-zero; after kill -9 the runs read RUNNING (never FINISHED), and resume=auto closes the
dead attempt's run as KILLED and finishes in a new child run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from illada_lightning.checkpoint import step_checkpoints
from illada_lightning.experiment.run import run_experiment
from tests.test_run_experiment import REPO, SMALL, small_config

pytestmark = pytest.mark.slow

ARGS = ["stage=pretrain", "pretrain.max_steps=100000", "pretrain.val_every_n_steps=0", "pretrain.limit_val_batches=1",
        "pretrain.optim.warmup_steps=0", "preview.num_prompts=0"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("illada-cache")


def launch(root: Path, cache: Path, *extra: str) -> subprocess.Popen:
    args = [*SMALL, f"runs_root={root}", f"pretrain.data.cache_dir={cache}", f"sft.data.cache_dir={cache}", *ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run did not get there in time")
        time.sleep(0.2)


def mlflow_statuses(root: Path, name: str = "default") -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    runs = json.loads((root / name / "mlflow_runs.json").read_text())
    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return {k: client.get_run(v).info.status for k, v in runs.items()}


def training_started(root: Path):
    # The child run exists once the stage has begun; the first periodic checkpoint (step 2) proves steps run.
    return lambda: bool(step_checkpoints(root / "default" / "pretrain" / "checkpoints"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_the_current_step_and_exits_non_zero(tmp_path, data_cache, sig, code):
    proc = launch(tmp_path, data_cache, "pretrain.ckpt_every_n_steps=2", "pretrain.ckpt_keep=1")
    try:
        wait_until(training_started(tmp_path), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("error:", "resume with:"))]
    assert lines[0].startswith(f"error: training interrupted by {signal.Signals(sig).name} at pretrain step "), lines
    saved = Path(lines[0].split("checkpoint saved: ")[1].split(". Continue")[0])
    step = int(lines[0].split("pretrain step ")[1].split(";")[0])
    assert saved.name == f"step={step:07d}.ckpt" and torch.load(saved, weights_only=False)["global_step"] == step
    assert lines[1].startswith("resume with: python -m experiments.run ") and lines[1].endswith(" resume=auto")
    assert mlflow_statuses(tmp_path) == {"parent": "KILLED", "pretrain": "KILLED"}


def test_kill_9_then_resume_closes_the_dead_attempt(tmp_path, data_cache):
    from mlflow.tracking import MlflowClient

    proc = launch(tmp_path, data_cache, "pretrain.ckpt_every_n_steps=2")
    try:
        wait_until(training_started(tmp_path), proc)
        proc.kill()  # SIGKILL: nothing can run in the process
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert mlflow_statuses(tmp_path) == {"parent": "RUNNING", "pretrain": "RUNNING"}  # not FINISHED
    dead = json.loads((tmp_path / "default" / "mlflow_runs.json").read_text())["pretrain"]
    last = max(int(p.name[5:12]) for p in step_checkpoints(tmp_path / "default" / "pretrain" / "checkpoints"))
    cfg = small_config(tmp_path, data_cache, *ARGS, f"pretrain.max_steps={last + 2}", "resume=auto")
    result = run_experiment(cfg, preview=False)
    assert result["stages"]["pretrain"]["resumed_from_step"] == last
    assert mlflow_statuses(tmp_path) == {"parent": "FINISHED", "pretrain": "FINISHED"}
    client = MlflowClient(result["tracking_uri"])
    assert client.get_run(dead).info.status == "KILLED"
    new = client.get_run(result["mlflow_runs"]["pretrain"])
    assert new.data.tags["illada.previous_attempt"] == dead and new.data.tags["illada.attempt"] == "2"
    assert new.data.tags["mlflow.parentRunId"] == result["mlflow_runs"]["parent"]


def test_sigterm_to_rank_zero_of_two_ddp_processes(tmp_path, data_cache):
    """Every rank agrees on the stop at the same step: one checkpoint, both processes end, exit 143."""
    proc = launch(tmp_path, data_cache, "strategy=ddp", "devices=2", "accelerator=cpu", "mlflow.enabled=false",
                  "pretrain.ckpt_every_n_steps=2", "pretrain.ckpt_keep=1")
    try:
        wait_until(training_started(tmp_path), proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    step = int(line.split("pretrain step ")[1].split(";")[0])
    saved = tmp_path / "default" / "pretrain" / "checkpoints" / f"step={step:07d}.ckpt"
    assert torch.load(saved, weights_only=False)["global_step"] == step
