"""The whole experiment: training (`training/`) with the per-epoch evaluation (`evaluation/`) attached.

This is the one layer that knows both: `ExperimentConfig` is the training config plus the `eval` group, and
`run_experiment` runs the stages with `PerEpochEvaluation` added to SFT when `eval.per_epoch=true` (the
SFT-epoch curve of iLLaDA Fig. 1). Training never imports evaluation; `python -m experiments.run` and the
sweeps call this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .evaluation.callback import PerEpochEvaluation
from .evaluation.config import EvalConfig
from .training.config import TrainingConfig
from .training.experiment import run_training


@dataclass
class ExperimentConfig(TrainingConfig):
    # Evaluation settings: `eval.per_epoch=true` evaluates `eval.tasks` after every SFT epoch
    # (evaluation/callback.py); sweeps and `experiments.evaluate` read the same group.
    eval: EvalConfig = field(default_factory=EvalConfig)


def per_epoch_callbacks(cfg: ExperimentConfig):
    """`stage -> [callbacks]`: the per-epoch evaluation for SFT when asked (the tokenizer comes from the datamodule)."""
    def callbacks(stage: str) -> list:
        return [PerEpochEvaluation(cfg.eval)] if stage == "sft" and cfg.eval.per_epoch else []

    return callbacks


def run_experiment(cfg: ExperimentConfig, *, extra_callbacks=(), preview: bool = True) -> dict:
    """Pretraining, SFT or both (`training.experiment.run_training`), with the per-epoch evaluation of SFT."""
    return run_training(cfg, extra_callbacks=extra_callbacks, stage_callbacks=per_epoch_callbacks(cfg),
                        preview=preview)
