"""Test support: a fake trial and a toy config schema exercise the sweep machinery (storage, nesting, resume, workers,
failures, reports) in seconds, without training anything (`trial_fn: tests.sweep_fakes:fake_trial`).

The metric is a deterministic function of the parameters, so tests can predict every value:
    eval/toy/acc = 0.5 + 0.1 * lr_index + 0.01 * epochs   (see `fake_metric`)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from illada_lightning.sweeps.context import TrialContext
from illada_lightning.sweeps.tracking import log_metrics

SCORING_BONUS = {"confidence": 0.05, "likelihood": 0.0}


@dataclass
class ToyTrainConfig:
    epochs: int = 1
    lr: float = 1e-3


@dataclass
class ToyEvalConfig:
    scoring_rule: str = "confidence"
    block_length: int = 32
    remasking: str = "low_confidence"

    def validate(self) -> None:
        if self.scoring_rule not in SCORING_BONUS and self.scoring_rule != "raise":
            raise ValueError(f"eval.scoring_rule {self.scoring_rule!r} is not one of {sorted(SCORING_BONUS)}")


@dataclass
class ToyExperimentConfig:
    seed: int = 0
    sft: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


def fake_metric(params: dict) -> float:
    """Deterministic accuracy from the trial's parameters (the numbers the tests check)."""
    acc = 0.5
    acc += 0.01 * float(params.get("sft.epochs", 0))
    acc += SCORING_BONUS.get(params.get("eval.scoring_rule"), 0.0)
    acc += 0.001 * float(params.get("eval.block_length", 0))
    acc += 0.002 * float(params.get("seed", 0))
    return round(acc, 6)


def fake_trial(ctx: TrialContext) -> dict[str, float]:
    """Log like a real run (params + eval metrics into the trial's MLflow run) and return the metrics.

    `eval.scoring_rule=raise` raises (a crashing trial). The environment variable ILLADA_FAKE_HANG_FROM=N makes
    trials numbered N or more hang (so a test can kill the sweep mid-trial); ILLADA_FAKE_SLEEP_S slows each trial.
    """
    if ctx.params.get("eval.scoring_rule") == "raise":
        raise RuntimeError("fake trial crashed on purpose")
    hang_from = os.environ.get("ILLADA_FAKE_HANG_FROM")
    if hang_from is not None and ctx.number >= int(hang_from):
        time.sleep(3600)
    time.sleep(float(os.environ.get("ILLADA_FAKE_SLEEP_S", "0")))
    acc = fake_metric(ctx.params)
    metrics = {"eval/toy/acc": acc, "eval/toy/acc_stderr": 0.01, "val/loss": round(2.0 - acc, 6)}
    log_metrics(ctx.client, ctx.run_id, metrics)
    return metrics


fake_trial.declared_metrics = ("eval/toy/acc", "eval/toy/acc_stderr", "val/loss")
