"""`run_experiment`: the configured stages (`training.experiment.run_training`) with the per-epoch evaluation of SFT."""

from __future__ import annotations

from ..evaluation.callback import PerEpochEvaluation
from ..training.experiment import run_training
from .config import ExperimentConfig


def per_epoch_callbacks(cfg: ExperimentConfig):
    """`stage -> [callbacks]`: the per-epoch evaluation for SFT when asked (the tokenizer comes from the datamodule)."""
    def callbacks(stage: str) -> list:
        return [PerEpochEvaluation(cfg.eval)] if stage == "sft" and cfg.eval.per_epoch else []

    return callbacks


def run_experiment(cfg: ExperimentConfig, *, extra_callbacks=(), preview: bool = True) -> dict:
    """Pretraining, SFT or both (`training.experiment.run_training`), with the per-epoch evaluation of SFT."""
    return run_training(cfg, extra_callbacks=extra_callbacks, stage_callbacks=per_epoch_callbacks(cfg),
                        preview=preview)
