"""What a run records for a researcher beyond the loss: MLflow's system metrics, started and stopped with the
stage's run (`mlflow.system_metrics`), and the interval metrics' arithmetic. The metric names of a real run are
checked in tests/test_run_experiment.py (the end-to-end run), the switch event in tests/test_training_plateau.py."""

from __future__ import annotations

import time

import pytest

from illada_lightning import runs
from illada_lightning.config import ConfigError
from illada_lightning.training.callbacks import mask_ratio_metrics
from illada_lightning.training.tracking import Tracker, check_tracking_uri, system_metrics_on
from tests.test_run_experiment import small_config


def test_system_metrics_are_on_for_gpu_runs_only_unless_asked(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, tmp_path)
    assert cfg.mlflow.system_metrics == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert not system_metrics_on(cfg.mlflow, "auto") and not system_metrics_on(cfg.mlflow, "cpu")
    assert system_metrics_on(cfg.mlflow, "gpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert system_metrics_on(cfg.mlflow, "auto")
    off = small_config(tmp_path, tmp_path, "mlflow.system_metrics=false")
    assert off.mlflow.system_metrics == "false" and not system_metrics_on(off.mlflow, "gpu")
    assert system_metrics_on(small_config(tmp_path, tmp_path, "mlflow.system_metrics=true").mlflow, "cpu")
    with pytest.raises(ConfigError, match="mlflow.system_metrics must be auto, true or false"):
        small_config(tmp_path, tmp_path, "mlflow.system_metrics=sometimes")


def test_explicit_system_metrics_without_psutil_is_refused_before_training(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("No module named 'psutil'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    cfg = small_config(tmp_path, tmp_path, "mlflow.system_metrics=true")
    with pytest.raises(ConfigError, match="mlflow.system_metrics=true: psutil is not installed"):
        check_tracking_uri(cfg.mlflow, tmp_path)


def test_system_metrics_sample_into_the_stage_run_and_stop_when_it_closes_or_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = small_config(tmp_path, tmp_path, "mlflow.system_metrics=true")
    (tmp_path / "default").mkdir()
    tracker = Tracker(cfg, tmp_path / "default")
    threads = {}
    for stage in ("pretrain", "sft"):
        run_id = tracker.begin_stage(stage)
        assert tracker.start_system_metrics(stage)
        threads[stage] = tracker.monitors[run_id]._process
        time.sleep(0.6)  # a few samples
    tracker.terminate("pretrain")  # the stage finished: its monitor stops, the other keeps sampling
    assert not threads["pretrain"].is_alive() and threads["sft"].is_alive()
    tracker.end("FAILED")  # a crash closes every run: the monitor stops with it
    assert not threads["sft"].is_alive() and tracker.monitors == {}
    for stage in ("pretrain", "sft"):
        logged = tracker.client.get_run(tracker.runs[stage]).data.metrics
        assert "system/cpu_utilization_percentage" in logged and "system/disk_usage_megabytes" in logged
    # Off (and auto on a CPU run): nothing starts, nothing is logged.
    quiet = small_config(tmp_path, tmp_path, "name=quiet", "mlflow.system_metrics=false")
    (tmp_path / "quiet").mkdir()
    tracker = Tracker(quiet, tmp_path / "quiet")
    tracker.begin_stage("pretrain")
    assert not tracker.start_system_metrics("pretrain") and tracker.monitors == {}


def test_loss_by_mask_ratio_metrics_skip_empty_bins():
    sums, counts = [6.0, 0.0, 3.0, 4.0, 10.0], [3.0, 0.0, 1.0, 2.0, 4.0]
    metrics = mask_ratio_metrics(sums + counts)
    assert metrics == {runs.LOSS_BY_MASK_RATIO[0]: 2.0, runs.LOSS_BY_MASK_RATIO[2]: 3.0,
                       runs.LOSS_BY_MASK_RATIO[3]: 2.0, runs.LOSS_BY_MASK_RATIO[4]: 2.5}
    assert runs.LOSS_BY_MASK_RATIO == ("train/loss_t0_20", "train/loss_t20_40", "train/loss_t40_60",
                                       "train/loss_t60_80", "train/loss_t80_100")
