"""What a run records for a researcher beyond the loss: MLflow's system metrics, started and stopped with the
stage's run (`mlflow.system_metrics`), the interval metrics' arithmetic, metrics held back by a tracking outage,
and the report's training plots read back from those records. The metric names of a real run are checked in
tests/test_run_experiment.py (the end-to-end run), the switch event in tests/test_training_plateau.py, a real
tracking server's outage in tests/test_cluster.py. One MLflow store serves the module."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from illada_lightning import runs
from illada_lightning.config import ConfigError
from illada_lightning.training.callbacks import mask_ratio_metrics
from illada_lightning.training.tracking import (
    MISSING_STEPS_TAG,
    Tracker,
    check_tracking_uri,
    system_metrics_on,
)
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


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A runs root whose MLflow store (`mlflow.db`) the tests of this module share: created once."""
    return tmp_path_factory.mktemp("records")


def test_system_metrics_sample_into_the_stage_run_and_stop_when_it_closes_or_fails(root, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    cfg = small_config(root, root, "mlflow.system_metrics=true")
    (root / "default").mkdir()
    tracker = Tracker(cfg, root / "default")
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
    quiet = small_config(root, root, "name=quiet", "mlflow.system_metrics=false")
    (root / "quiet").mkdir()
    tracker = Tracker(quiet, root / "quiet")
    tracker.begin_stage("pretrain")
    assert not tracker.start_system_metrics("pretrain") and tracker.monitors == {}


def test_loss_by_mask_ratio_metrics_skip_empty_bins():
    sums, counts = [6.0, 0.0, 3.0, 4.0, 10.0], [3.0, 0.0, 1.0, 2.0, 4.0]
    metrics = mask_ratio_metrics(sums + counts)
    assert metrics == {runs.LOSS_BY_MASK_RATIO[0]: 2.0, runs.LOSS_BY_MASK_RATIO[2]: 3.0,
                       runs.LOSS_BY_MASK_RATIO[3]: 2.0, runs.LOSS_BY_MASK_RATIO[4]: 2.5}
    assert runs.LOSS_BY_MASK_RATIO == ("train/loss_t0_20", "train/loss_t20_40", "train/loss_t40_60",
                                       "train/loss_t60_80", "train/loss_t80_100")


def _log_history(client, run_id: str, key: str, points) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(key, float(v), 1000 + step, step) for step, v in points])


def test_report_plots_loss_against_tokens_with_the_switch_loss_by_mask_ratio_and_mfu(root, monkeypatch):
    from mlflow import MlflowClient

    from illada_lightning.reporting import build_report, plots

    client = MlflowClient(runs.default_tracking_uri(root))
    exp = client.create_experiment("curves", artifact_location=(root / "artifacts").as_uri())
    steps = range(10, 110, 10)
    gpu = client.create_run(exp, run_name="gpu/pretrain").info.run_id  # what a GPU pretraining run logs
    _log_history(client, gpu, runs.TRAIN_LOSS, [(s - 1, 8.0 - 0.02 * s) for s in steps])
    _log_history(client, gpu, runs.TOKENS_SEEN, [(s - 1, 4096.0 * s) for s in steps])
    _log_history(client, gpu, runs.TOKENS_PER_S, [(s - 1, 1e5 if s > 10 else 2e4) for s in steps])
    _log_history(client, gpu, runs.MFU, [(s - 1, 0.40 if s > 10 else 0.05) for s in steps])
    _log_history(client, gpu, runs.MAX_MEMORY_GIB, [(s - 1, 11.5) for s in steps])
    for k, name in enumerate(runs.LOSS_BY_MASK_RATIO):  # higher loss at higher mask ratio, falling with training
        _log_history(client, gpu, name, [(s - 1, 5.0 + k - 0.01 * s) for s in steps])
    client.log_metric(gpu, runs.LR_SWITCH_STEP, 49.0, step=49)
    client.set_tag(gpu, runs.LR_SWITCH_TAG, "49")
    client.log_param(gpu, runs.GEMM_TFLOPS_PARAM, "700.0")
    cpu = client.create_run(exp, run_name="cpu/pretrain").info.run_id  # a CPU run: no MFU, no memory
    _log_history(client, cpu, runs.TRAIN_LOSS, [(s - 1, 8.5 - 0.01 * s) for s in steps])
    _log_history(client, cpu, runs.TOKENS_SEEN, [(s - 1, 2048.0 * s) for s in steps])
    _log_history(client, cpu, runs.TOKENS_PER_S, [(s - 1, 3e3) for s in steps])

    axes = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (axes.__setitem__(path.name, [
        (ax.get_xlabel(), ax.get_ylabel(), [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()])
        for ax in fig.axes]), save(fig, path))[1])
    report = build_report(runs.default_tracking_uri(root), experiment="curves", out_root=root / "reports",
                          log_artifact=False)
    md = report.path.read_text()
    assert sorted(p.name for p in report.plots) == ["loss_by_mask_ratio.png", "throughput.png", "training_loss.png"]
    for path in report.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({path.name})" in md
    # Every axis named with its unit; every curve of a plot its own (line style, marker): readable in grey.
    for name, panels in axes.items():
        for x_label, y_label, styles in panels:
            assert "(" in y_label and (x_label == "" or "(" in x_label or x_label == "optimizer step"), (name, x_label)
            assert len(set(styles)) == len(styles), (name, styles)
    (x_label, y_label, _), = axes["training_loss.png"]
    assert x_label == "tokens seen (thousands)" and "nats/token" in y_label
    assert "`gpu/pretrain` (run" in md and "plateau LR switch at step 49 (204,800 tokens seen)" in md
    assert "`cpu/pretrain` (run" in md and "no LR switch logged" in md
    assert axes["loss_by_mask_ratio.png"][0][0].startswith("mask ratio t (%)")
    # The profile table: the first interval and the mean of the last quarter of the logged span (steps 69-99) per bin.
    assert "| gpu/pretrain | step 9 | 4.900 | 5.900 | 6.900 | 7.900 | 8.900 |" in md
    assert "| gpu/pretrain | steps 69-99 | 4.150 | 5.150 | 6.150 | 7.150 | 8.150 |" in md
    assert [p[1] for p in axes["throughput.png"]] == ["throughput (tokens/s)", "MFU (% of measured bf16 GEMM rate)"]
    assert "| gpu/pretrain | 100,000 | 40.0% | 11.5 | 700.0 |" in md  # the first (start-up) interval left out
    assert "| cpu/pretrain | 3,000 | – | – | – |" in md


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_logs_mfu_memory_the_gemm_rate_and_system_metrics(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from illada_lightning.experiment.run import run_experiment

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = small_config(tmp_path, tmp_path / "cache", "accelerator=gpu", "precision=bf16-mixed", "stage=pretrain",
                       "pretrain.max_steps=40", "pretrain.val_every_n_steps=0", "pretrain.log_every_n_steps=10")
    result = run_experiment(cfg, preview=False)
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_runs"]["pretrain"])
    assert float(run.data.params[runs.GEMM_TFLOPS_PARAM]) > 10  # any CUDA GPU of this decade
    mfu = [m.value for m in client.get_metric_history(run.info.run_id, runs.MFU)]
    assert len(mfu) == 4 and all(0 < v < 1 for v in mfu)
    assert 0 < run.data.metrics[runs.MAX_MEMORY_GIB] < 80
    assert set(runs.LOSS_BY_MASK_RATIO) <= set(run.data.metrics)
    assert "system/gpu_0_utilization_percentage" in run.data.metrics  # system metrics on by default on GPU


def _outage_logger(tmp_path: Path, fail: list[str]):
    """A stage logger on a SQLite store whose `log_batch` fails as `fail` says, call by call: "lost" (the request
    never arrives), "stored" (the store keeps the batch, the answer is lost: a server killed mid-request),
    "refused" (the server answers 400)."""
    from mlflow.exceptions import RestException
    from mlflow.tracking import MlflowClient

    from illada_lightning.training.tracking import StageLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = StageLogger(experiment_name="outage", tracking_uri=uri, run_id=run_id,
                         unsent_file=tmp_path / "unsent.jsonl")
    send = logger.experiment.log_batch

    def flaky(*args, **kwargs):
        how = fail.pop(0) if fail else None
        if how == "refused":
            raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "a metric it will not take"})
        if how == "stored":
            send(*args, **kwargs)
        if how:
            raise ConnectionError(f"server gone ({how})")
        send(*args, **kwargs)

    logger.experiment.log_batch = flaky
    return logger, client, run_id


def test_a_batch_the_server_stored_before_failing_is_not_logged_twice(tmp_path):
    logger, client, run_id = _outage_logger(tmp_path, ["stored", "lost", "lost"])
    for step in range(4):
        logger.log_metrics({"train/loss": 5.0 - step}, step=step)
        time.sleep(0.005)  # later attempts carry later clocks: only the first attempt's time makes a resend equal
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [0, 1, 2, 3] and not logger.unsent


def test_metrics_still_unsent_at_the_end_are_kept_in_a_file_and_named_on_the_run(tmp_path):
    logger, client, run_id = _outage_logger(tmp_path, ["lost"] * 4)
    logger.log_metrics({"train/loss": 4.0}, step=0)
    logger.log_metrics({"train/loss": 3.0}, step=1)
    logger.finalize()
    kept = [json.loads(line) for line in (tmp_path / "unsent.jsonl").read_text().splitlines()]
    assert [(k["step"], k["metrics"]) for k in kept] == [(0, {"train/loss": 4.0}), (1, {"train/loss": 3.0})]
    assert client.get_run(run_id).data.tags[MISSING_STEPS_TAG] == "0,1"
    assert client.get_metric_history(run_id, "train/loss") == []


def test_a_batch_the_server_refuses_is_set_aside_and_never_holds_back_the_next(tmp_path):
    logger, client, run_id = _outage_logger(tmp_path, [None, "refused"])
    for step in range(4):
        logger.log_metrics({"train/loss": 5.0 - step}, step=step)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 2, 3] and not logger.unsent
    logger.finalize()
    kept = [json.loads(line) for line in (tmp_path / "unsent.jsonl").read_text().splitlines()]
    assert [(k["step"], k["metrics"]) for k in kept] == [(1, {"train/loss": 4.0})]
    assert client.get_run(run_id).data.tags[MISSING_STEPS_TAG] == "1"
