"""What a trial function receives: its Optuna trial, parameters, overrides and the MLflow run to log into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient

from .spec import SweepSpec

# A trial function: gets a TrialContext, returns its final metrics ({"eval/cloze/acc": 0.61, ...}) or the
# objective value alone. It may raise optuna.TrialPruned (via `ctx.report` or the Lightning pruning callback).
TrialFn = Callable[["TrialContext"], "dict[str, float] | float"]


@dataclass
class TrialContext:
    spec: SweepSpec
    trial: optuna.Trial
    params: dict[str, Any]  # this trial's values, keyed by config key
    trial_overrides: list[str]  # the same as `key=value`
    run_id: str  # the trial's MLflow run, nested under the sweep's parent run
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    client: MlflowClient
    output_dir: Path  # <sweep output>/trial_<number>: the trial's own run directory
    setup: dict[str, Any] = field(default_factory=dict)  # what the sweep's one-off setup produced (checkpoint, ...)

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def overrides(self) -> list[str]:
        """Base overrides of the sweep followed by the trial's own (later wins)."""
        return [*self.spec.overrides, *self.trial_overrides]

    def report(self, value: float, step: int) -> None:
        """Report an intermediate objective value; raises optuna.TrialPruned when the pruner says so."""
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({value:.6g})")

    def pruning_callback(self, monitor: str | None = None):
        """A Lightning callback reporting `monitor` (default: the pruner's) after every validation."""
        from .pruning import OptunaPruningCallback

        return OptunaPruningCallback(self.trial, monitor or self.spec.pruner.monitor)


@dataclass
class SetupContext:
    """The one-off work before the trials of an eval_only / per_epoch sweep (train the shared checkpoint)."""

    spec: SweepSpec
    run_id: str  # a run nested under the parent (role "base") for that training
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    client: MlflowClient
    output_dir: Path
