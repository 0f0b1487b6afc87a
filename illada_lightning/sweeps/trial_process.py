"""One rank of a trial's process group (`process_group.py` launches it on every rank):

    python -m illada_lightning.sweeps.trial_process <trial dir>/trial_config.yaml --schema MODULE:CLASS

Runs `run_experiment` on the trial's resolved config (Lightning finds its rank from torchrun's or SLURM's
environment). When the sweep prunes, rank 0 reports the pruner's monitor to the Optuna trial through the
storage (`ILLADA_TRIAL_*`, set by the worker) and every rank stops when it says prune (`OptunaPruningCallback`
broadcasts the decision). Rank 0 writes `trial_result.json` beside the config: `run_experiment`'s result, or
{"pruned": reason}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import optuna

from ..checkpoint import atomic_write
from ..config import load_config
from ..experiment.run import run_experiment
from .process_group import ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL_ID, RESULT_FILE
from .pruning import OptunaPruningCallback
from .spec import PrunerSpec
from .study import make_pruner, open_storage
from .targets import import_object


def global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def storage_trial() -> optuna.Trial:
    """The worker's Optuna trial, reached through the storage (rank 0 only)."""
    pruner = PrunerSpec(**json.loads(os.environ[ENV_PRUNER]))
    study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=open_storage(os.environ[ENV_STORAGE]),
                              pruner=make_pruner(pruner))
    return optuna.trial.Trial(study, int(os.environ[ENV_TRIAL_ID]))


def pruning_callbacks() -> list:
    if ENV_TRIAL_ID not in os.environ:
        return []
    monitor = PrunerSpec(**json.loads(os.environ[ENV_PRUNER])).monitor
    return [OptunaPruningCallback(storage_trial() if global_rank() == 0 else None, monitor)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m illada_lightning.sweeps.trial_process")
    parser.add_argument("config", help="the trial's resolved experiment config (written by the sweep worker)")
    parser.add_argument("--schema", default="illada_lightning.experiment.config:ExperimentConfig")
    args = parser.parse_args(argv)
    cfg = load_config(import_object(args.schema), args.config, [])
    try:
        outcome = run_experiment(cfg, extra_callbacks=pruning_callbacks(), preview=False)
    except optuna.TrialPruned as exc:
        outcome = {"pruned": str(exc)}
    if global_rank() == 0:
        text = json.dumps(outcome, default=str)
        atomic_write(Path(args.config).with_name(RESULT_FILE), lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
