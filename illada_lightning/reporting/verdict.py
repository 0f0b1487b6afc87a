"""What a finished sweep found, in the report's words: the sentence `sweeps.run` and `experiments.run --multirun`
print is the one `reports.make` writes under the sweep's table (`report.best_setting_line`), so the terminal
never names a best setting that the report calls a tie."""

from __future__ import annotations

from mlflow import MlflowClient

from .collect import fetch_runs
from .report import best_setting_line, swept_keys


def sweep_verdict(tracking_uri: str, parent_run_id: str) -> str:
    """The best-setting sentence for the finished trials directly under the sweep's parent run."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = fetch_runs(client, [experiment_id])
    parent = next(r for r in runs if r.run_id == parent_run_id)
    trials = [r for r in runs if r.parent_id == parent_run_id and r.role == "trial" and r.status == "FINISHED"]
    objective = parent.tags.get("sweep.objective")
    return best_setting_line(trials, swept_keys(parent, trials), objective, parent.tags.get("sweep.direction"))
