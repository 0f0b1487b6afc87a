"""MLflow tracking: one parent run per experiment, one nested child run per stage (pretrain, sft).

The child runs carry the `mlflow.parentRunId` tag, which is how the MLflow UI nests them under the parent
(the same tag `mlflow.start_run(nested=True)` writes). Training logs through Lightning's `MLFlowLogger`
bound to the child run. Run ids are kept in `<run_dir>/mlflow_runs.json`, so a resumed experiment keeps
its parent run.

Statuses are truthful: a run is RUNNING only while a process works on it (Lightning's logger would mark it
FINISHED at the end of every fit, even the validation before training), and ends FINISHED, FAILED (an
error, a non-finite stop) or KILLED (a stop signal). Each attempt at a stage is its own child run: on resume
the previous attempt's run, if its process died leaving it RUNNING, is closed as KILLED, and the new run
points to it (`illada.previous_attempt`, `illada.attempt`).

System metrics (`mlflow.system_metrics`, on by default for GPU runs): MLflow's `SystemMetricsMonitor`, bound
to the stage's run by id (training logs through a Lightning logger, so there is no fluent active run for
`mlflow.start_run(log_system_metrics=True)` to watch), started with the stage's run and stopped when it is
closed, whichever way. It samples the whole machine (every GPU of the node) from rank 0.

Default store (`mlflow.tracking_uri: null`): `sqlite:///<runs_root>/mlflow.db`, the backend MLflow 3
recommends (the file store is deprecated), with artifacts under `<runs_root>/mlartifacts`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from illada_lightning.provenance import git_commit
from illada_lightning.runs import EXPERIMENT_TAGS, mark_training_experiment, server_unreachable

from .. import runs
from ..checkpoint import atomic_write
from ..config import ConfigError, flatten, to_dict
from ..redact import mask_password, mask_values
from ..runs import ATTEMPT_TAG, PARENT_TAG, PREVIOUS_ATTEMPT_TAG, RUNS_FILE, STAGE_TAG
from .slurm import slurm_tags

log = logging.getLogger(__name__)


def tracking_uri(mlflow_cfg, runs_root: str | Path) -> str:
    if mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri
    Path(runs_root).expanduser().resolve().mkdir(parents=True, exist_ok=True)
    return runs.default_tracking_uri(runs_root)


def artifact_location(mlflow_cfg, runs_root: str | Path) -> str | None:
    return mlflow_cfg.artifact_location or runs.artifact_location(mlflow_cfg.tracking_uri, runs_root)


def system_metrics_on(mlflow_cfg, accelerator: str) -> bool:
    """`mlflow.system_metrics`: true, false, or auto = on when the run trains on a GPU (on CPU they would only
    cost a sampling thread)."""
    if mlflow_cfg.system_metrics == "auto":
        import torch

        return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return mlflow_cfg.system_metrics == "true"


def _system_metrics_missing() -> str | None:
    """Why MLflow's system metrics cannot run here (psutil missing), or None."""
    try:
        import psutil  # noqa: F401  (what MLflow's CPU, memory and disk monitors read)
    except ImportError:
        return "psutil is not installed (pip install psutil nvidia-ml-py)"
    return None


def check_tracking_uri(mlflow_cfg, runs_root: str | Path, timeout_s: float = 10.0) -> None:
    """Before training: a SQLite store must live in an existing directory (one under the runs root is
    created), and a tracking server must accept connections; each refusal is one line naming the URI.
    System metrics asked for explicitly need psutil."""
    uri = mlflow_cfg.tracking_uri
    if mlflow_cfg.enabled and mlflow_cfg.system_metrics == "true" and _system_metrics_missing():
        raise ConfigError(f"mlflow.system_metrics=true: {_system_metrics_missing()}")
    if not mlflow_cfg.enabled or not uri:
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        root = Path(runs_root).expanduser().resolve()
        if db.parent.is_dir():
            return
        if db.is_relative_to(root):
            db.parent.mkdir(parents=True, exist_ok=True)
            return
        raise ConfigError(f"mlflow.tracking_uri={uri}: directory {db.parent} does not exist; create it, or leave "
                          f"mlflow.tracking_uri unset for {root / 'mlflow.db'}")
    problem = server_unreachable(uri, timeout_s)
    if problem:
        raise ConfigError(f"mlflow.tracking_uri={mask_password(uri)}: cannot reach the tracking server ({problem}); "
                          "start it, fix the URI or set mlflow.enabled=false")


UNSENT_FILE = "mlflow_unsent_metrics.jsonl"
MISSING_STEPS_TAG = "illada.metrics_missing_steps"


class StageLogger(MLFlowLogger):
    """Lightning's MLflow logger, bound to one stage run, that never changes the run's status and never loses a
    metric to a tracking-server outage.

    - Status: Lightning ends the run FINISHED after every fit and validate (the run then looked finished during
      training and after kill -9); the Tracker decides instead.
    - Outages: MLflow's client retries each request for about 4 minutes (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, 7
      with backoff), so a server down for less than that delays the logging call and loses nothing. Past that,
      the metrics of the failed call are kept and sent again before the next call, with their first attempt's
      timestamp (a batch the server stored before dying unanswered is then dropped as equal, not stored twice).
      A call the server refuses (HTTP 4xx) is set aside instead, so it never holds back the calls after it.
      Whatever is still unsent or refused when the stage ends is written to
      `<stage dir>/mlflow_unsent_metrics.jsonl` and its steps are named in the run's tag
      `illada.metrics_missing_steps` (and in a warning), so a reader of the run sees what is missing.
    """

    def __init__(self, *args, unsent_file: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unsent: list[tuple[dict[str, float], int | None, int]] = []  # metrics, step, time (ms)
        self.refused: list[tuple[dict[str, float], int | None, int]] = []  # what the server answered 4xx to
        self.unsent_file = unsent_file

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        numbers = {key: float(value) for key, value in metrics.items() if not isinstance(value, str)}  # as Lightning
        self.unsent.append((numbers, step, int(time.time() * 1000)))
        self.flush()

    def flush(self) -> bool:
        """Send the metrics not sent yet, oldest first; False while the server is unreachable (what it refuses is
        set aside)."""
        from mlflow.entities import Metric

        while self.unsent:
            metrics, step, timestamp_ms = self.unsent[0]
            try:  # the first attempt's timestamp: a batch the server stored before failing to answer is not
                # stored twice (MLflow's SQL store drops a metric equal in key, step, value and timestamp)
                self.experiment.log_batch(self.run_id, metrics=[Metric(key, value, timestamp_ms, step or 0)
                                                                for key, value in metrics.items()])
            except Exception as exc:
                if refused_by_server(exc):  # sending it again cannot help: keep it aside, go on with the rest
                    log.warning("MLflow server refused the metrics of step %s (%s); they go to %s at the end",
                                step, mask_password(str(exc))[:300], self.unsent_file)
                    self.refused.append(self.unsent.pop(0))
                    continue
                # MLflow's own retries are spent: keep them for the next call
                log.warning("MLflow server %s unreachable (%s: %s): %d logging call(s) held back, sent when it "
                            "returns", mask_password(self._tracking_uri or ""), type(exc).__name__,
                            mask_password(str(exc))[:300], len(self.unsent))
                return False
            self.unsent.pop(0)
        return True

    def finalize(self, status: str = "success") -> None:
        self.flush()
        lost = sorted(self.refused + self.unsent, key=lambda call: call[2])
        if not lost or self.unsent_file is None:
            return
        steps = sorted({step or 0 for _, step, _ in lost})
        with open(self.unsent_file, "a") as f:
            for metrics, step, timestamp_ms in lost:
                f.write(json.dumps({"step": step, "metrics": metrics, "time": timestamp_ms / 1000}) + "\n")
        log.warning("%d logging call(s) (steps %s) never reached MLflow; they are in %s", len(lost), steps,
                    self.unsent_file)
        try:
            self.experiment.set_tag(self.run_id, MISSING_STEPS_TAG, ",".join(map(str, steps))[:5000])
        except Exception:  # still down: the file and the warning say it
            pass
        self.unsent, self.refused = [], []


def refused_by_server(exc: Exception) -> bool:
    """The server answered and refused the request (an HTTP 4xx other than 429, too many requests): a resend
    gets the same answer. An unreachable server raises other errors, and those are worth a resend."""
    from mlflow.exceptions import RestException

    if not isinstance(exc, RestException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status != 429


class Tracker:
    """The MLflow side of one experiment (rank 0 only)."""

    def __init__(self, cfg, run_dir: str | Path):
        import mlflow  # imported lazily: the CLI's --help and config errors stay fast
        from mlflow.tracking import MlflowClient

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.uri = tracking_uri(cfg.mlflow, cfg.runs_root)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment_id(cfg.mlflow.experiment_name,
                                                 artifact_location(cfg.mlflow, cfg.runs_root))
        self.runs = self._load_runs()
        self.commit = git_commit() if git_commit() != "unknown" else None
        self.open: list[str] = []  # runs this process set RUNNING and must close
        self.monitors: dict[str, Any] = {}  # run id -> the SystemMetricsMonitor sampling into it

    def _experiment_id(self, name: str, location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return mark_training_experiment(self.client, found.experiment_id)
        return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)

    def _load_runs(self) -> dict[str, str]:
        path = self.run_dir / RUNS_FILE
        runs = json.loads(path.read_text()) if path.is_file() else {}
        return {k: v for k, v in runs.items() if self._exists(v)}

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def _save_runs(self) -> None:
        text = json.dumps(self.runs, indent=2) + "\n"
        atomic_write(self.run_dir / RUNS_FILE, lambda f: f.write(text.encode()))

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def _tags(self) -> dict[str, str]:
        tags = {"illada.experiment": self.cfg.name, "illada.run_dir": str(self.run_dir.resolve()),
                "illada.model": self.cfg.model.name}
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        return {**tags, **slurm_tags()}

    def parent_run_id(self) -> str:
        if "parent" not in self.runs:
            run = self.client.create_run(self.experiment_id, run_name=self.cfg.name, tags=self._tags())
            self.runs["parent"] = run.info.run_id
            self._save_runs()
            self.log_params(self.runs["parent"], flatten(to_dict(self.cfg)))
        parent = self.runs["parent"]
        if parent not in self.open:  # this process now works on the experiment (again, after a resume)
            if self.status(parent) != "RUNNING":
                self.client.update_run(parent, status="RUNNING")
            self.open.append(parent)
        return parent

    def begin_stage(self, stage: str) -> str:
        """A new child run for this attempt at `stage`. The previous attempt's run, left RUNNING by a process
        that died (kill -9, a node failure), is closed as KILLED."""
        parent = self.parent_run_id()
        tags = {**self._tags(), PARENT_TAG: parent, STAGE_TAG: stage, ATTEMPT_TAG: "1"}
        previous = self.runs.get(stage)
        if previous is not None:
            if self.status(previous) == "RUNNING":
                self.client.set_tag(previous, "illada.stopped", "its process ended without closing the run; "
                                    "closed as KILLED when the experiment was resumed")
                self.client.set_terminated(previous, "KILLED")
            attempt = int(self.client.get_run(previous).data.tags.get(ATTEMPT_TAG, "1")) + 1
            tags.update({PREVIOUS_ATTEMPT_TAG: previous, ATTEMPT_TAG: str(attempt)})
        run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name}/{stage}", tags=tags)
        self.runs[stage] = run.info.run_id
        self.open.append(run.info.run_id)
        self._save_runs()
        return run.info.run_id

    def tag_open(self, key: str, value: str) -> list[str]:
        """Tag every run this process still holds open (before `end` closes them); returns their ids."""
        held = [run_id for run_id in self.open if self.status(run_id) == "RUNNING"]
        for run_id in held:
            self.client.set_tag(run_id, key, value)
        return held

    def start_system_metrics(self, stage: str) -> bool:
        """Sample GPU/CPU/memory/disk into the stage's run (`system/*`) until it is closed, when
        `mlflow.system_metrics` says so; True when started."""
        if not system_metrics_on(self.cfg.mlflow, self.cfg.accelerator):
            return False
        missing = _system_metrics_missing()
        if missing:
            log.warning("MLflow system metrics are off: %s", missing)
            return False
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        run_id = self.stage_run_id(stage)
        self.stop_system_metrics(run_id)
        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.uri)
        monitor.start()
        self.monitors[run_id] = monitor
        return True

    def stop_system_metrics(self, run_id: str | None = None) -> None:
        """Stop the monitor of `run_id` (all monitors: None), flushing what it has sampled."""
        for key in [run_id] if run_id is not None else list(self.monitors):
            monitor = self.monitors.pop(key, None)
            if monitor is not None:
                monitor.finish()

    def end(self, status: str) -> None:
        """Close every run this process opened and has not closed yet (FINISHED, FAILED or KILLED)."""
        self.stop_system_metrics()
        for run_id in reversed(self.open):
            if self.status(run_id) == "RUNNING":
                self.client.set_terminated(run_id, status)
        self.open = []

    def stage_run_id(self, stage: str) -> str:
        """The child run of `stage` (created on first use, nested under the parent)."""
        parent = self.parent_run_id()
        if stage not in self.runs:
            tags = {**self._tags(), PARENT_TAG: parent, STAGE_TAG: stage}
            run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name}/{stage}", tags=tags)
            self.runs[stage] = run.info.run_id
            self._save_runs()
        return self.runs[stage]

    def logger(self, stage: str) -> StageLogger:
        """Lightning's MLflow logger bound to the stage's child run (which it never closes)."""
        return StageLogger(experiment_name=self.cfg.mlflow.experiment_name, tracking_uri=self.uri,
                           run_id=self.stage_run_id(stage), log_model=False,
                           unsent_file=self.run_dir / stage / UNSENT_FILE)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in mask_values(params).items() if k not in existing]
        for start in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_stage_params(self, stage: str, params: dict[str, Any]) -> None:
        self.log_params(self.stage_run_id(stage), params)

    def log_artifact(self, stage: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.stage_run_id(stage), str(path), artifact_path)

    def log_artifacts(self, stage: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.stage_run_id(stage), str(directory), artifact_path)

    def set_tag(self, stage: str, key: str, value: Any) -> None:
        run_id = self.runs["parent"] if stage == "parent" else self.stage_run_id(stage)
        self.client.set_tag(run_id, key, mask_password(str(value)))

    def log_metrics(self, stage: str, metrics: dict[str, float], step: int | None = None) -> None:
        run_id = self.runs["parent"] if stage == "parent" else self.stage_run_id(stage)
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value), step=step or 0)

    def terminate(self, stage: str, status: str = "FINISHED") -> None:
        run_id = self.runs["parent"] if stage == "parent" else self.runs.get(stage)
        if run_id:
            self.stop_system_metrics(run_id)
            self.client.set_terminated(run_id, status)
            if run_id in self.open:
                self.open.remove(run_id)

    def describe(self) -> str:
        parent = self.runs.get("parent")
        return (f"MLflow store: {mask_password(self.uri)} (experiment '{self.cfg.mlflow.experiment_name}', "
                f"parent run {parent}, child runs {', '.join(f'{k}={v}' for k, v in self.runs.items() if k != 'parent')})")
