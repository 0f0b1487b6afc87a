"""MLflow tracking: one parent run per experiment, one nested child run per stage (pretrain, sft).

The child runs carry the `mlflow.parentRunId` tag, which is how the MLflow UI nests them under the parent
(the same tag `mlflow.start_run(nested=True)` writes). Training logs through Lightning's `MLFlowLogger`
bound to the child run. Run ids are kept in `<run_dir>/mlflow_runs.json`, so a resumed experiment keeps
logging into the same runs.

Default store (`mlflow.tracking_uri: null`): `sqlite:///<runs_root>/mlflow.db`, the backend MLflow 3
recommends (the file store is deprecated), with artifacts under `<runs_root>/mlartifacts`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from illada_lightning.experiment_kind import EXPERIMENT_TAGS, mark_training_experiment
from illada_lightning.provenance import git_commit

from ..config import flatten, to_dict

log = logging.getLogger(__name__)

RUNS_FILE = "mlflow_runs.json"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(mlflow_cfg, runs_root: str | Path) -> str:
    if mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri
    root = Path(runs_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(mlflow_cfg, runs_root: str | Path) -> str | None:
    if mlflow_cfg.artifact_location:
        return mlflow_cfg.artifact_location
    uri = mlflow_cfg.tracking_uri
    if uri and uri.startswith("sqlite:///"):  # a local database: artifacts beside it, not in ./mlruns of the cwd
        return (Path(uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
    if uri:  # a user's server decides where artifacts go
        return None
    return (Path(runs_root).expanduser().resolve() / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUNS_FILE).write_text(json.dumps(self.runs, indent=2) + "\n")

    def _tags(self) -> dict[str, str]:
        tags = {"illada.experiment": self.cfg.name, "illada.run_dir": str(self.run_dir.resolve()),
                "illada.model": self.cfg.model.name}
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        return tags

    def parent_run_id(self) -> str:
        if "parent" not in self.runs:
            run = self.client.create_run(self.experiment_id, run_name=self.cfg.name, tags=self._tags())
            self.runs["parent"] = run.info.run_id
            self._save_runs()
            self.log_params(self.runs["parent"], flatten(to_dict(self.cfg)))
        return self.runs["parent"]

    def stage_run_id(self, stage: str) -> str:
        """The child run of `stage` (created on first use, nested under the parent)."""
        parent = self.parent_run_id()
        if stage not in self.runs:
            tags = {**self._tags(), PARENT_TAG: parent, "illada.stage": stage}
            run = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name}/{stage}", tags=tags)
            self.runs[stage] = run.info.run_id
            self._save_runs()
        return self.runs[stage]

    def logger(self, stage: str):
        """Lightning's MLFlowLogger bound to the stage's child run."""
        from lightning.pytorch.loggers import MLFlowLogger

        run_id = self.stage_run_id(stage)
        logger = MLFlowLogger(experiment_name=self.cfg.mlflow.experiment_name, tracking_uri=self.uri,
                              run_id=run_id, log_model=False)
        return logger

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
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
        self.client.set_tag(run_id, key, str(value))

    def log_metrics(self, stage: str, metrics: dict[str, float], step: int | None = None) -> None:
        run_id = self.runs["parent"] if stage == "parent" else self.stage_run_id(stage)
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value), step=step or 0)

    def terminate(self, stage: str, status: str = "FINISHED") -> None:
        run_id = self.runs["parent"] if stage == "parent" else self.runs.get(stage)
        if run_id:
            self.client.set_terminated(run_id, status)

    def describe(self) -> str:
        parent = self.runs.get("parent")
        return (f"MLflow store: {self.uri} (experiment '{self.cfg.mlflow.experiment_name}', "
                f"parent run {parent}, child runs {', '.join(f'{k}={v}' for k, v in self.runs.items() if k != 'parent')})")
