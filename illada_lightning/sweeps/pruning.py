"""Optuna pruning from Lightning 2.x: report a monitored metric after every validation, stop bad trials.

optuna-integration's PyTorchLightningPruningCallback targets the old `pytorch_lightning` package; this one uses
`lightning.pytorch` and only public Trainer state (`callback_metrics`, `current_epoch`, `sanity_checking`).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import optuna


class OptunaPruningCallback(pl.Callback):
    def __init__(self, trial: optuna.Trial, monitor: str = "val/loss"):
        super().__init__()
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return  # this validation did not compute the metric (e.g. only some epochs evaluate)
        value = float(value)
        # The step Optuna compares across trials: the optimizer step, so runs with different epoch lengths align.
        step = int(trainer.global_step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.monitor} is {value} at step {step}")
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={value:.6g}")
