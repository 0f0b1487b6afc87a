"""MLflow bookkeeping of a sweep: one parent run per study, one nested run per trial.

Everything goes through `MlflowClient` (never the fluent `mlflow.start_run`), so no process-global "active run"
leaks between a sweep, its trials and the Lightning `MLFlowLogger` the training code uses.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from ..experiment_kind import EXPERIMENT_TAGS, mark_training_experiment
from ..provenance import git_commit
from .storage import sqlite_path

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "sweep.role"  # parent | trial | base (the one training run an eval_only / per_epoch sweep reuses)
MAX_PARAM_LEN = 6000
MAX_ERROR_LEN = 4000


class TrackingError(RuntimeError):
    """The MLflow tracking URI cannot be opened."""


def client_for(tracking_uri: str) -> MlflowClient:
    path = sqlite_path(tracking_uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot open MLflow tracking URI {tracking_uri!r}: {exc}") from None
    return MlflowClient(tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id of `name`, creating it (artifacts next to a SQLite store, not in the working directory)."""
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as exc:
        raise TrackingError(f"cannot open MLflow tracking URI {tracking_uri!r}: {type(exc).__name__}: {exc}") from None
    if exp is not None:
        return mark_training_experiment(client, exp.experiment_id)
    path = sqlite_path(tracking_uri)
    location = (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # another worker created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def param_str(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LEN]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches (MLflow accepts at most 100 per call); keys already logged are kept (MLflow
    refuses to change a param, and a trial's own values are logged first)."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, param_str(v)) for k, v in sorted(params.items()) if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

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


def create_parent_run(client: MlflowClient, experiment_id: str, sweep_name: str, study_name: str, tags: dict) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{sweep_name}",
        tags={ROLE_TAG: "parent", "sweep.name": sweep_name, "sweep.study": study_name,
              "git_commit": git_commit(), **{k: param_str(v) for k, v in tags.items()}},
    )
    return run.info.run_id


def create_child_run(
    client: MlflowClient, experiment_id: str, parent_run_id: str, run_name: str, role: str, tags: dict[str, Any]
) -> str:
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={PARENT_TAG: parent_run_id, ROLE_TAG: role, "git_commit": git_commit(),
              **{k: param_str(v) for k, v in tags.items()}},
    )
    return run.info.run_id


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
