"""`run_training(cfg)`: pretraining, SFT, or both, with checks first, MLflow tracking and resume.

Order of work, one module per job:
1. `preflight.py`: everything that can be wrong is checked before any training step.
2. `stage.py`, per stage with a Trainer from `trainer_factory.py`: resume from the newest good step
   checkpoint, fit (non-finite guard and rollback, graceful stop on SIGTERM/SIGINT), final checkpoint,
   export, MLflow.
3. `preview.py`: a few generated answers from the final model.

Every way out closes the MLflow runs truthfully: FINISHED, FAILED (an error, a non-finite stop) or KILLED
(a stop signal; SLURM's time-limit signal also requeues the job, slurm.py). Distributed runs (one process per
device) execute this whole function on every rank; files and MLflow are written by rank 0 only, and ranks meet
at barriers where one reads what another wrote.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from ..checkpoint import atomic_write, load_checkpoint
from ..config import ConfigError, flatten, to_dict, to_yaml
from ..redact import mask_password, mask_values
from ..runs import CONFIG_FILE, REQUEUED_TAG, ui_command
from .config import TrainingConfig
from .interrupt import GracefulStop, TrainingInterrupted
from .preflight import RunDirectoryError, is_rank_zero, preflight, stages_of  # noqa: F401  (public names)
from .preview import preview_answers
from .slurm import job_id, request_requeue, requeue_wanted
from .stage import run_stage
from .tracking import Tracker, tracking_uri

log = logging.getLogger(__name__)

__all__ = ["RunDirectoryError", "TrainingInterrupted", "is_rank_zero", "run_training", "stages_of"]


def warn_config_drift(cfg: TrainingConfig, saved: Path) -> list[str]:
    """On resume, name the settings that differ from the run being continued (allowed, but worth seeing)."""
    if cfg.resume != "auto" or not saved.is_file():
        return []
    before = flatten(yaml.safe_load(saved.read_text()) or {})
    now = mask_values(flatten(to_dict(cfg)))  # the saved file holds no passwords
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and k not in ("resume", "progress_bar"))
    if changed:
        log.warning("resume=auto continues %s with changed settings: %s", saved.parent,
                    ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:20]))
    return changed


def start_tracking(cfg: TrainingConfig, run_dir: Path) -> Tracker | None:
    """Rank 0: save the resolved config and open (or reopen, on resume) the MLflow parent run."""
    warn_config_drift(cfg, run_dir / CONFIG_FILE)
    text = mask_password(to_yaml(cfg))  # logged as an artifact: credentials stay on the command line
    atomic_write(run_dir / CONFIG_FILE, lambda f: f.write(text.encode()))
    if not cfg.mlflow.enabled:
        return None
    try:
        tracker = Tracker(cfg, run_dir)
        tracker.parent_run_id()
        tracker.client.log_artifact(tracker.runs["parent"], str(run_dir / CONFIG_FILE))
    except Exception as exc:  # MLflow's errors run to pages: one line naming the store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(mask_password(f"MLflow store {tracking_uri(cfg.mlflow, cfg.runs_root)}: {first}")) from exc
    return tracker


def _exit_status(exc: BaseException) -> str:
    return "KILLED" if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt, SystemExit)) else "FAILED"


def _close_interrupted(cfg: TrainingConfig, exc: BaseException, tracker: Tracker | None) -> None:
    """Close this process's MLflow runs KILLED or FAILED; after SLURM's time-limit signal, then ask for the
    requeue (rank 0), last: SLURM ends the job as soon as it accepts (slurm.py)."""
    requeue = isinstance(exc, TrainingInterrupted) and requeue_wanted(cfg, exc.signum)
    held = tracker.tag_open(REQUEUED_TAG, f"asked for SLURM job {job_id()}") if tracker and requeue else []
    if tracker is not None:
        tracker.end(_exit_status(exc))
    if not (requeue and is_rank_zero()):
        return
    accepted, exc.requeue = request_requeue()
    for run_id in held:
        tracker.client.set_tag(run_id, REQUEUED_TAG, exc.requeue)
    log.log(logging.INFO if accepted else logging.ERROR, exc.requeue)


def run_training(cfg: TrainingConfig, *, extra_callbacks=(), stage_callbacks=None, preview: bool = True) -> dict:
    """Run the configured stages; returns a result dict (per-stage summaries, MLflow location, samples).

    `extra_callbacks` join every stage's Trainer; `stage_callbacks(stage) -> [Callback, ...]` adds callbacks for
    one stage (how `illada_lightning.experiment` attaches the per-epoch evaluation to SFT)."""
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer, datamodules = preflight(cfg)
    run_dir = Path(cfg.resolved_run_dir)
    result: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}}
    stop, tracker = GracefulStop(), None
    stop.install()  # from here on a stop signal is recorded, and acted on at the end of a training step
    try:
        tracker = start_tracking(cfg, run_dir) if is_rank_zero() else None
        for stage in stages_of(cfg):
            if stop.requested:  # arrived after the previous stage had finished
                raise stop.interrupted(stage)
            callbacks = [*extra_callbacks, *(stage_callbacks(stage) if stage_callbacks else [])]
            result["stages"][stage] = run_stage(cfg, stage, tokenizer, datamodules[stage], tracker, callbacks, stop)
    except BaseException as exc:
        _close_interrupted(cfg, exc, tracker)
        raise
    finally:
        stop.restore()
    if tracker is not None:
        tracker.end("FINISHED")
        result.update(tracking_uri=tracker.uri, mlflow_runs=dict(tracker.runs),
                      mlflow_experiment=cfg.mlflow.experiment_name, ui_command=ui_command(tracker.uri))
    if preview and is_rank_zero() and "sft" in result["stages"]:
        device = "cuda" if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda") else "cpu"
        model, _ = load_checkpoint(run_dir / "sft" / "model.pt", device=device)
        result["samples"] = preview_answers(cfg, model, tokenizer)
    return result
