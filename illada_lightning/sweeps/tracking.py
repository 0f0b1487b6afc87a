"""MLflow bookkeeping of a sweep: one parent run per study, one nested run per trial.

Everything goes through `MlflowClient` (never the fluent `mlflow.start_run`), so no process-global "active run"
leaks between a sweep, its trials and the Lightning `MLFlowLogger` the training code uses.
"""

from __future__ import annotations

import fcntl
import functools
import json
import time
import traceback
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from ..provenance import git_commit
from ..redact import mask_password
from ..runs import (
    EXPERIMENT_TAGS,
    PARENT_TAG,
    ROLE_TAG,
    RUNS_FILE,
    SWEEP_ERROR_TAG,
    SWEEP_STATE_TAG,
    artifact_location,
    mark_training_experiment,
    sqlite_path,
)

MAX_PARAM_LEN = 6000
MAX_ERROR_LEN = 4000


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be opened."""


class file_lock:  # noqa: N801 (used like a function: `with file_lock(path) as lock:`)
    """An exclusive lock on `path` across processes (the OS drops it when the holder dies); `release()` may
    come early, inside the `with` block."""

    def __init__(self, path: Path):
        self.path, self._handle = path, None

    def __enter__(self) -> file_lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a")
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __exit__(self, *exc) -> None:
        self.release()


@functools.cache
def _create_store_once(tracking_uri: str) -> None:
    """Create a SQLite store's schema under a lock beside it: two processes migrating a fresh store at once
    crash (`duplicate column name: step`); the second one here finds it created."""
    path = sqlite_path(tracking_uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"cannot open MLflow tracking URI {tracking_uri!r}: {exc}") from None
    with file_lock(path.with_name(path.name + ".lock")):
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def client_for(tracking_uri: str) -> MlflowClient:
    if sqlite_path(tracking_uri) is not None:
        _create_store_once(tracking_uri)
    return MlflowClient(tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id of `name`, creating it (artifacts next to a SQLite store, not in the working directory)."""
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:
        raise TrackingError(f"cannot open MLflow tracking URI {tracking_uri!r}: {type(exc).__name__}: {exc}") from None
    if exp is not None:
        return mark_training_experiment(client, exp.experiment_id)
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri), tags=EXPERIMENT_TAGS)
    except Exception:  # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def param_str(value: Any) -> str:
    """A param or tag value as MLflow stores it: JSON for lists and dicts, passwords of URLs masked."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return mask_password(text)[:MAX_PARAM_LEN]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches (MLflow accepts at most 100 per call); keys already logged are kept (MLflow
    refuses to change a param, and a trial's own values are logged first)."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, param_str(v)) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, param_str(v)) for k, v in sorted(tags.items())])


def run_exists(client: MlflowClient, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # deleted or unknown
        return False


def create_run(client: MlflowClient, experiment_id: str, run_name: str, role: str, tags: dict[str, Any],
               parent_run_id: str | None = None) -> str:
    """A sweep's run (`role` parent | trial | base), nested under `parent_run_id` when given."""
    nesting = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    run = client.create_run(experiment_id, run_name=run_name, tags={
        **nesting, ROLE_TAG: role, "git_commit": git_commit(), **{k: param_str(v) for k, v in tags.items()}})
    return run.info.run_id


def finish_run(client: MlflowClient, run_id: str, status: str, state: str, error: str | None = None) -> None:
    """End a trial's run: MLflow status FINISHED | FAILED | KILLED, the Optuna state and error as tags."""
    set_tags(client, run_id, {SWEEP_STATE_TAG: state, **({SWEEP_ERROR_TAG: error} if error else {})})
    client.set_terminated(run_id, status=status)


def close_running(client: MlflowClient, run_ids, status: str) -> None:
    """Terminate those of `run_ids` still RUNNING (runs of a process that died or was stopped)."""
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
        except Exception:  # a run that never got created or was deleted
            pass


def stage_runs(run_dir: Path) -> list[str]:
    """The training code's run ids of one run directory (parent and stages)."""
    path = run_dir / RUNS_FILE
    return list(json.loads(path.read_text()).values()) if path.is_file() else []


def close_runs_of_trial(spec, trial, reason: str) -> None:
    """A trial whose worker died: its MLflow run and the training runs below it end KILLED, with the reason."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    client = client_for(spec.resolved_tracking_uri)
    with_tags = client.get_run(run_id).info.status == "RUNNING"
    close_running(client, [*stage_runs(spec.resolved_output_dir / f"trial_{trial.number:04d}"), run_id], "KILLED")
    if with_tags:
        set_tags(client, run_id, {SWEEP_STATE_TAG: "FAIL", SWEEP_ERROR_TAG: reason})


def nest_under(client: MlflowClient, run_ids: list[str], parent_run_id: str, tags: dict[str, Any]) -> None:
    """Hang runs that the experiment code created on its own under `parent_run_id` (and tag them)."""
    for run_id in run_ids:
        if run_id and run_id != parent_run_id and run_exists(client, run_id):
            current = client.get_run(run_id).data.tags.get(PARENT_TAG)
            extra = {} if current else {PARENT_TAG: parent_run_id}
            set_tags(client, run_id, {**extra, **tags})


def error_text(exc: BaseException) -> str:
    """The error line, then the innermost frames of the traceback (where the cause is), within MAX_ERROR_LEN."""
    head = f"{type(exc).__name__}: {exc}"[: MAX_ERROR_LEN // 2]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{head}\n...{frames[-(MAX_ERROR_LEN - len(head) - 4):]}"
