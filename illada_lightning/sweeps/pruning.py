"""Optuna pruning from Lightning 2.x: report a monitored metric after every validation, stop bad trials.

optuna-integration's PyTorchLightningPruningCallback targets the old `pytorch_lightning` package; this one uses
`lightning.pytorch` and only public Trainer state (`callback_metrics`, `global_step`, `sanity_checking`).
In a trial that is a process group (`process_group.py`) only rank 0 holds the Optuna trial (`trial=None`
elsewhere): it reports and decides, and the decision is broadcast so that every rank stops at the same step.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import optuna


class OptunaPruningCallback(pl.Callback):
    def __init__(self, trial: optuna.Trial | None, monitor: str = "val/loss"):
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.last_step = -1  # the final validation repeats the last step's: Optuna keeps the first report

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return  # this validation did not compute the metric (e.g. only some epochs evaluate)
        value = float(value)  # the same on every rank: val/loss is averaged over ranks (sync_dist)
        # The step Optuna compares across trials: the optimizer step, so runs with different epoch lengths align.
        step = int(trainer.global_step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.monitor} is {value} at step {step}")
        reason = None
        if self.trial is not None and step > self.last_step:
            self.last_step = step
            self.trial.report(value, step)
            if self.trial.should_prune():
                reason = f"pruned at step {step}: {self.monitor}={value:.6g}"
        if trainer.world_size > 1:
            reason = trainer.strategy.broadcast(reason, src=0)
        if reason is not None:
            raise optuna.TrialPruned(reason)
