"""One training stage (pretraining or SFT): resume or start, fit with rollback, then checkpoint, export, record.

`run_stage` skips a finished stage (resume=auto), resumes from the newest step checkpoint that loads, rolls
back to the newest checkpoint with finite weights after a non-finite loss/gradient/weight (on_nan=rollback),
stops with a checkpoint on SIGTERM/SIGINT (`GracefulStop`), and at the end saves the final step, validates,
exports `model.pt`, writes `FINISHED` and closes the stage's MLflow run as FINISHED. Failures close the runs
in `run_experiment`, which sees every exception.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..checkpoint import (
    FINISHED_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    export_model,
    find_resume_checkpoint,
    full_model_state,
    last_checkpoint,
    load_init_weights,
    read_finished,
    remove_partial_writes,
    write_finished,
)
from ..config import flatten, to_dict
from ..runs import VAL_LOSS
from .callbacks import LossPlateauLRSwitch, NonFiniteLossError, NonFiniteLossGuard, ThroughputMonitor
from .config import TrainingConfig
from .interrupt import GracefulStop
from .lora import lora_run_params, stage_lora
from .preflight import is_rank_zero, sft_init_path
from .run_record import RunRecord
from .step_checkpoint import StepCheckpoint
from .trainer_factory import build_module, make_trainer

log = logging.getLogger(__name__)


def _callback(trainer: pl.Trainer, cls):
    return next((c for c in trainer.callbacks if isinstance(c, cls)), None)


def _has_val(datamodule) -> bool:
    loader = datamodule.val_dataloader()
    return loader is not None and not (isinstance(loader, list) and not loader)


def _val_loss(results: list[dict]) -> float | None:
    return float(results[0][VAL_LOSS]) if results and VAL_LOSS in results[0] else None


def loss_summary(first: list[tuple[int, float]], recent: list[tuple[int, float]]) -> dict[str, float | None]:
    """First and last training loss, and means over the first and last few micro-batches."""
    if not first or not recent:
        return {"first_loss": None, "last_loss": None}
    k = max(1, min(10, len(first) // 10, len(recent) // 10))
    head, tail = [v for _, v in first[:k]], [v for _, v in recent[-k:]]
    return {"first_loss": first[0][1], "last_loss": recent[-1][1],
            "first_loss_avg": sum(head) / k, "last_loss_avg": sum(tail) / k}


def _stage_module(cfg: TrainingConfig, stage: str, tokenizer, lr_scale: float = 1.0):
    module = build_module(cfg, stage, lr_scale=lr_scale)
    module.tokenizer_json = tokenizer.to_str()  # embedded in checkpoints (with its special ids): one file restores both
    return module


def _should_skip(cfg: TrainingConfig, stage: str, stage_dir: Path) -> dict | None:
    """The FINISHED summary when resume=auto meets a finished stage (preflight refused resume=never), except
    pretraining asked to run longer: its LR schedule does not depend on max_steps, so it continues exactly."""
    finished = read_finished(stage_dir)
    if finished is None:
        return None
    if stage == "pretrain" and cfg.pretrain.max_steps > finished["global_step"] and last_checkpoint(stage_dir):
        log.info("pretrain: extending the finished run in %s from step %d to %d", stage_dir,
                 finished["global_step"], cfg.pretrain.max_steps)
        if is_rank_zero():
            (stage_dir / FINISHED_FILE).unlink()
        return None
    log.info("%s: already finished in %s, skipping", stage, stage_dir)
    return {**finished, "skipped": True}


def _initial_weights(cfg: TrainingConfig, stage: str, module, ckpt_path: Path | None) -> str | None:
    """A stage not resuming starts from init_from (SFT, continued pretraining) or, for SFT, this run's
    pretraining (stage=all); returns that path."""
    if ckpt_path is not None or (stage == "pretrain" and not cfg.init_from):
        return None
    run_dir = Path(cfg.resolved_run_dir)
    init_path = str(run_dir / "pretrain") if cfg.stage == "all" else sft_init_path(cfg)
    if init_path is None:
        log.warning("SFT starts from randomly initialised weights (no init_from and no pretraining in %s)", run_dir)
        return None
    _, resolved = load_init_weights(module.model, init_path, cfg.model)
    return str(resolved)


def _open_stage_run(tracker, cfg: TrainingConfig, stage: str, ckpt_path: Path | None):
    """This attempt's MLflow child run (rank 0) and the Lightning logger bound to it."""
    if tracker is None:
        return None
    tracker.begin_stage(stage)
    # the full config on every run: each stands alone (+ a LoRA stage's trainable and total parameter counts)
    tracker.log_stage_params(stage, {**flatten(to_dict(cfg)), **lora_run_params(cfg, stage)})
    if ckpt_path is not None:
        tracker.set_tag(stage, "illada.resumed_from", str(ckpt_path))
    tracker.start_system_metrics(stage)  # until the run is closed (Tracker.terminate / Tracker.end)
    return tracker.logger(stage)


def _unless_stopped(stop: GracefulStop | None, fn, *args, **kwargs):
    """Run a Trainer call; Lightning's own SIGTERM exit (a signal it saw first) is ours to report."""
    try:
        return fn(*args, **kwargs)
    except SIGTERMException:
        if stop is None or not stop.requested:
            raise
        return None


def _nonfinite_failure(cfg: TrainingConfig, guard: NonFiniteLossGuard, good: Path | None, rollbacks: int) -> str:
    if cfg.on_nan == "stop":
        return guard.describe()
    return (f"{guard.reason}, and no rollback left "
            f"({'no checkpoint with finite weights yet' if good is None else f'{rollbacks} rollbacks done'}); "
            "rerun with a lower LR")


def _newest_finite(stage_dir: Path) -> Path | None:
    try:
        return find_resume_checkpoint(stage_dir, finite=True)
    except CheckpointError:
        return None


def fit_with_rollback(cfg, stage, tokenizer, datamodule, logger, ckpt_path, callbacks, tracker, stop):
    """Fit until done, a stop signal, or a non-finite value; on_nan=rollback reloads the newest checkpoint with
    finite weights with the LR scaled by nan_lr_scale, up to max_rollbacks times."""
    stage_dir = Path(cfg.resolved_run_dir) / stage
    record = next(c for c in callbacks if isinstance(c, RunRecord))
    module = _stage_module(cfg, stage, tokenizer)
    init_path = _initial_weights(cfg, stage, module, ckpt_path)
    if tracker is not None:
        tracker.set_tag(stage, "illada.init_from", init_path or "")
    rollbacks, lr_scale = 0, 1.0
    while True:
        trainer = make_trainer(cfg, stage, stage_dir, logger, callbacks)
        if ckpt_path is None and rollbacks == 0 and _has_val(datamodule):
            # The bound before training, with the same fixed masks as every later evaluation.
            results = _unless_stopped(stop, trainer.validate, module, datamodule=datamodule, verbose=False)
            record.initial_val_loss = _val_loss(results or [])
        _unless_stopped(stop, trainer.fit, module, datamodule=datamodule,
                        ckpt_path=str(ckpt_path) if ckpt_path else None)
        record.keep_first_losses(module)
        guard = _callback(trainer, NonFiniteLossGuard)
        if guard.triggered_step is None or (stop is not None and stop.requested):
            return trainer, module, rollbacks
        good = _newest_finite(stage_dir)
        if cfg.on_nan == "rollback" and good is not None and rollbacks < cfg.max_rollbacks:
            rollbacks += 1
            lr_scale *= cfg.nan_lr_scale
            log.warning("rollback %d/%d to %s with the LR scaled by %g", rollbacks, cfg.max_rollbacks, good, lr_scale)
            if tracker is not None:
                tracker.set_tag(stage, f"illada.rollback_{rollbacks}",
                                f"step {guard.triggered_step} -> {good}, lr x{lr_scale:g}")
            module, ckpt_path = _stage_module(cfg, stage, tokenizer, lr_scale), good
            continue
        message = _nonfinite_failure(cfg, guard, good, rollbacks)
        if tracker is not None:
            tracker.set_tag(stage, "illada.stopped", message)
        raise NonFiniteLossError(message)


def _summary(stage: str, trainer, module, record: RunRecord, final_ckpt: Path, val_loss, rollbacks: int) -> dict:
    summary = {
        "stage": stage, "global_step": trainer.global_step, "initial_val_loss": record.initial_val_loss,
        "val_loss": val_loss, "wall_time_s": record.wall_time_s(), "tokens_per_s": module.last_throughput,
        "tokens_per_s_mean": _callback(trainer, ThroughputMonitor).mean_tokens_per_s,
        "checkpoint": str(final_ckpt), "export": str(final_ckpt.parents[1] / "model.pt"), "rollbacks": rollbacks,
        "resumed_from_step": record.resumed_step, "summary_covers": record.scope(trainer.global_step),
        **loss_summary(record.first_losses or [], list(module.recent_losses)),
    }
    switch = _callback(trainer, LossPlateauLRSwitch)
    if switch is not None:
        summary.update(lr_switch_step=switch.switch_step, lr_switch_loss=switch.switch_loss)
    return summary


def _record_finished(cfg: TrainingConfig, stage: str, summary: dict, tracker, step: int) -> None:
    if tracker is None:
        return
    metrics = {k: v for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    tracker.log_metrics(stage, {f"final/{k}": v for k, v in metrics.items()}, step=step)
    stage_dir = Path(cfg.resolved_run_dir) / stage
    if cfg.mlflow.log_checkpoint:
        tracker.log_artifact(stage, stage_dir / "model.pt", "model")
    if cfg.mlflow.log_tokenizer:
        tracker.log_artifacts(stage, Path(cfg.resolved_run_dir) / TOKENIZER_DIR, "tokenizer")
    tracker.terminate(stage)


def finish_stage(cfg, stage, trainer, module, datamodule, record, rollbacks, tracker) -> dict:
    """Final checkpoint, validation, export, FINISHED and the MLflow record."""
    stage_dir = Path(cfg.resolved_run_dir) / stage
    final_ckpt = _callback(trainer, StepCheckpoint).save(trainer, module)
    if final_ckpt is None:
        raise NonFiniteLossError(f"{stage}: the final weights hold NaN/inf; they were not saved")
    val_loss = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False)) if _has_val(datamodule) else None
    state = full_model_state(trainer, module)
    summary = _summary(stage, trainer, module, record, final_ckpt, val_loss, rollbacks)
    if trainer.is_global_zero:
        lora = stage_lora(cfg, stage)  # model.pt holds the weights with the adapters merged in
        export_model(stage_dir / "model.pt", cfg.model, state, module.tokenizer_json,
                     {"stage": stage, "global_step": trainer.global_step,
                      "lora_merged": asdict(lora) if lora else None})
        write_finished(stage_dir, summary)
        _record_finished(cfg, stage, summary, tracker, trainer.global_step)
    trainer.strategy.barrier("export")  # the next stage reads model.pt
    return summary


def run_stage(cfg: TrainingConfig, stage: str, tokenizer, datamodule, tracker=None, extra_callbacks=(),
              stop: GracefulStop | None = None) -> dict:
    stage_dir = Path(cfg.resolved_run_dir) / stage
    skipped = _should_skip(cfg, stage, stage_dir)
    if skipped is not None:
        return skipped
    if is_rank_zero():
        remove_partial_writes(stage_dir / "checkpoints")
    # The newest step checkpoint that loads (each one that does not is named in a warning).
    ckpt_path = find_resume_checkpoint(stage_dir) if cfg.resume == "auto" else None
    log.info("%s: training %s", stage, f"resumed from {ckpt_path}" if ckpt_path else "from the start")
    logger = _open_stage_run(tracker, cfg, stage, ckpt_path)
    record = RunRecord()
    callbacks = [*extra_callbacks, record, *([stop] if stop is not None else [])]
    trainer, module, rollbacks = fit_with_rollback(cfg, stage, tokenizer, datamodule, logger, ckpt_path, callbacks,
                                                   tracker, stop)
    # Stopped by a signal: at a checkpointed step, or (Lightning saw it first) before training got going.
    if stop is not None and (stop.stopped_step is not None or
                             (stop.requested and trainer.state.status != TrainerStatus.FINISHED)):
        raise stop.interrupted(stage)
    return finish_stage(cfg, stage, trainer, module, datamodule, record, rollbacks, tracker)
