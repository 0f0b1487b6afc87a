"""Trials that are distributed jobs run as process groups of their own (illada_lightning/sweeps/process_group.py).

The end-to-end checks train real (tiny) FSDP2 runs on two gloo CPU processes per trial, launched by torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient

from illada_lightning.sweeps.process_group import TrialProcessError, launch_command, needs_process_group
from illada_lightning.sweeps.pruning import OptunaPruningCallback
from illada_lightning.sweeps.spec import SweepSpec
from illada_lightning.sweeps.study import open_storage

REPO = Path(__file__).resolve().parents[1]
TINY_FSDP = [
    "stage=pretrain", "pretrain.max_steps=4", "pretrain.val_every_n_steps=2", "pretrain.optim.min_lr=1e-5",
    "progress_bar=false", "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1",
    "model.ffn_dim=128", "model.vocab_size=512", "model.max_seq_len=64", "tokenizer.vocab_size=512",
    "pretrain.data.max_seq_len=64", "pretrain.batch_size=4", "pretrain.limit_val_batches=1",
    "strategy=fsdp", "accelerator=cpu", "devices=2",
]


def _cfg(devices="2", num_nodes=1):
    return SimpleNamespace(accelerator="cpu", devices=devices, num_nodes=num_nodes)


def test_configs_asking_for_several_processes_need_a_process_group():
    assert needs_process_group(_cfg("2")) and needs_process_group(_cfg("1", num_nodes=2))
    assert not needs_process_group(_cfg("1")) and not needs_process_group(_cfg("auto"))


def test_one_node_trials_launch_with_torchrun_and_multi_node_ones_need_slurm(tmp_path, monkeypatch):
    spec = SweepSpec(name="s")
    cmd = launch_command(_cfg("2"), spec, tmp_path / "c.yaml")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-4:] == ["illada_lightning.sweeps.trial_process", str(tmp_path / "c.yaml"), "--schema", spec.schema]
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(TrialProcessError, match="inside a SLURM allocation of 2 nodes"):
        launch_command(_cfg("4", num_nodes=2), spec, tmp_path / "c.yaml")
    # Inside an allocation (a stand-in `srun` on PATH): one task per device on each node.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    cmd = launch_command(_cfg("4", num_nodes=2), spec, tmp_path / "c.yaml")
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    with pytest.raises(TrialProcessError, match="trial_launcher=torchrun starts one node"):
        launch_command(_cfg("4", num_nodes=2), SweepSpec(name="s", trial_launcher="torchrun"), tmp_path / "c.yaml")


class _Strategy:
    def __init__(self, rank0_reason):
        self.rank0_reason = rank0_reason

    def broadcast(self, obj, src=0):
        return self.rank0_reason  # what rank 0 decided, whatever this rank computed


def _trainer(strategy, world_size=2, value=1.0, step=4):
    return SimpleNamespace(sanity_checking=False, callback_metrics={"val/loss": value}, global_step=step,
                           world_size=world_size, strategy=strategy)


def test_pruning_decision_of_rank_zero_stops_every_rank():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first = study.ask()
    first.report(1.0, 4)
    study.tell(first, 1.0)
    rank0 = OptunaPruningCallback(study.ask(), "val/loss")
    reason = "pruned at step 4: val/loss=5"
    with pytest.raises(optuna.TrialPruned, match="pruned at step 4"):
        rank0.on_validation_end(_trainer(_Strategy(reason), value=5.0), None)
    other = OptunaPruningCallback(None, "val/loss")  # rank 1 holds no trial: it follows rank 0
    with pytest.raises(optuna.TrialPruned, match="pruned at step 4"):
        other.on_validation_end(_trainer(_Strategy(reason), value=5.0), None)
    other.on_validation_end(_trainer(_Strategy(None), value=5.0), None)  # rank 0 said go on


def _sweep(tmp_path: Path, *extra: str, n_trials: int = 2) -> subprocess.CompletedProcess:
    items = [*TINY_FSDP, f"runs_root={tmp_path / 'runs'}", *extra]
    overrides = "overrides=[" + ",".join(f'"{item}"' for item in items) + "]"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sweeps.run", "sweeps/lr_search.yaml", f"n_trials={n_trials}",
                           f"output_dir={tmp_path / 'out'}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                           overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_a_sweep_of_two_fsdp_trials_on_two_processes_each_completes(tmp_path):
    proc = _sweep(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 complete, 0 failed" in proc.stdout
    study = optuna.load_study(study_name="lr_search", storage=open_storage(f"sqlite:///{tmp_path / 'out/optuna.db'}"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial in study.trials:
        trial_dir = tmp_path / "out" / f"trial_{trial.number:04d}"
        runs = json.loads((trial_dir / "mlflow_runs.json").read_text())
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert runs["parent"] == run.info.run_id and run.info.status == "FINISHED"
        pretrain = client.get_run(runs["pretrain"])  # logged by rank 0 of the trial's own process group
        assert pretrain.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert pretrain.info.status == "FINISHED" and pretrain.data.params["strategy"] == "fsdp"
        assert run.data.metrics["val/loss"] == pytest.approx(trial.value)
        # the two ranks really ran: the sharded checkpoint holds one shard file per rank
        shards = list((trial_dir / "pretrain" / "checkpoints").glob("*/__*_0.distcp"))
        assert {p.name for p in shards} >= {"__0_0.distcp", "__1_0.distcp"}


def test_a_process_group_that_dies_is_a_fail_with_its_log_tail_not_a_hang(tmp_path, monkeypatch):
    """What the worker sees when a rank dies: the launcher exits non-zero; the error names the code and the
    log's last lines (the real launcher, torchrun, then stops the other ranks itself)."""
    from illada_lightning.sweeps import process_group

    dying = [sys.executable, "-c", "import sys; print('rank 1: Segmentation fault (core dumped)'); sys.exit(139)"]
    monkeypatch.setattr(process_group, "launch_command", lambda cfg, spec, config_file: dying)
    cfg = SimpleNamespace(accelerator="cpu", devices="2", num_nodes=1)
    monkeypatch.setattr(process_group, "to_yaml", lambda cfg: "stage: pretrain\n")
    with pytest.raises(TrialProcessError, match="exited with code 139") as failed:
        process_group.run_in_process_group(cfg, SweepSpec(name="s"), tmp_path / "trial_0000")
    assert "rank 1: Segmentation fault" in str(failed.value)
    assert (tmp_path / "trial_0000" / "trial_config.yaml").stat().st_mode & 0o077 == 0  # owner-only
