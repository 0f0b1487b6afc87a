"""`ExperimentConfig`: the training config plus the `eval` group (what `python -m experiments.run` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluation.config import EvalConfig
from ..training.config import TrainingConfig


@dataclass
class ExperimentConfig(TrainingConfig):
    # Evaluation settings: `eval.per_epoch=true` evaluates `eval.tasks` after every SFT epoch
    # (evaluation/callback.py); sweeps and `experiments.evaluate` read the same group.
    eval: EvalConfig = field(default_factory=EvalConfig)
