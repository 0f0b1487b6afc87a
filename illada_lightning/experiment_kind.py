"""The MLflow experiment kind of every experiment this project creates (training, sweeps, evaluations, reports).

MLflow 3's UI opens an experiment on its GenAI pages (traces, "Detect Issues", an assistant panel) unless the
experiment's `mlflow.experimentKind` tag says it holds model training; `custom_model_development` makes it
open on the runs table with metrics and charts. No MLflow import here: callers pass their client.
"""

from __future__ import annotations

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}


def mark_training_experiment(client, experiment_id: str) -> str:
    """Tag the experiment (new or found, so stores made by older versions get it too); returns its id."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id
