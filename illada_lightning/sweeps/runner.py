"""Run a sweep: prepare the study once, then worker processes run `study.optimize` one trial at a time until
the budget is spent; each trial is an MLflow run nested under the sweep's parent run.

    result = run_sweep(load_sweep_spec("sweeps/scoring_rule.yaml"))

Our code only maps an Optuna trial to a run (`run_trial`); asking, telling, heartbeats, stale trials and
retries are Optuna's (see `study.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from ..config import flatten
from ..logs import configure_logging, configured_level
from ..redact import mask_password
from ..runs import SWEEP_NAME_TAG, SWEEP_PARAM_PREFIX, SWEEP_STUDY_TAG, TRIAL_NUMBER_TAG
from . import trials
from .context import SetupContext, TrialContext, TrialFn
from .database import study_lock
from .space import suggest, to_overrides
from .spec import SweepSpec
from .study import (
    fail_dead_trials,
    not_started,
    open_storage,
    open_study,
    pending_work,
    requeue_failed,
    space_signature,
)
from .targets import TargetError, import_object
from .tracking import (
    client_for,
    create_run,
    ensure_experiment,
    error_text,
    finish_run,
    log_metrics,
    log_params,
    run_exists,
    set_tags,
)
from .validate import SweepError, validate_sweep

log = logging.getLogger(__name__)
ATTR_PARENT, ATTR_EXPERIMENT, ATTR_SPACE, ATTR_SETUP = (
    "mlflow_parent_run_id", "mlflow_experiment_id", "sweep_space", "sweep_setup")
DISCARDED = "result discarded: another worker marked the trial dead (no heartbeat) and queued it again"
BUILT_IN = {"train": trials.train_trial, "eval_only": trials.eval_only_trial, "per_epoch": trials.per_epoch_trial}


class WorkerInterrupted(KeyboardInterrupt):
    """A stop signal ended the trial's training: the worker stops too (Optuna records the trial FAIL, as for
    Ctrl-C). `exit_code` is the shell's 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass
class SweepResult:
    study_name: str
    storage: str  # password masked (as every URL this package stores or prints)
    tracking_uri: str
    parent_run_id: str
    n_complete: int
    n_failed: int
    n_pruned: int
    n_pending: int  # not started, WAITING or RUNNING: the sweep was interrupted (or other workers are busy)
    best_value: float | None
    best_params: dict[str, Any] | None
    errors: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (trial number, error) of FAILs
    objective: str = ""  # the metric best_value is of
    mlflow_experiment: str = ""  # where the parent run and its trials are


def resolve_trial_fn(spec: SweepSpec, trial_fn: TrialFn | str | None) -> TrialFn:
    """The injected function, else `spec.trial_fn`, else the built-in trial of the sweep's mode."""
    if callable(trial_fn):
        return trial_fn
    ref = trial_fn or spec.trial_fn
    if not ref:
        return BUILT_IN[spec.mode]
    try:
        fn = import_object(ref)
    except TargetError as exc:
        raise SweepError(str(exc)) from None
    if not callable(fn):
        raise SweepError(f"trial_fn {ref!r} is not callable")
    return fn


# One trial -------------------------------------------------------------------------------------------------------
def _final_metrics(out: Any, objective: str) -> dict[str, float]:
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        out = {objective: out}
    if not isinstance(out, dict):
        raise TypeError(f"a trial function must return a dict of metrics or a number, got {type(out).__name__}")
    metrics = {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if objective not in metrics:
        raise KeyError(f"objective metric {objective!r} was not returned by the trial (it returned {sorted(metrics)})")
    if not math.isfinite(metrics[objective]):
        raise ValueError(f"objective {objective} is {metrics[objective]}")
    return metrics


def run_trial(trial: optuna.Trial, spec: SweepSpec, trial_fn: TrialFn, worker: str) -> float:
    """The objective: run `trial_fn` inside the trial's MLflow run; Optuna records the outcome."""
    client, attrs = client_for(spec.resolved_tracking_uri), trial.study.user_attrs
    params = suggest(trial, spec.space)
    run_id = create_run(
        client, attrs[ATTR_EXPERIMENT], f"{spec.name}-trial-{trial.number}", "trial",
        {**_sweep_tags(spec), TRIAL_NUMBER_TAG: trial.number, "sweep.worker": worker,
         **{f"{SWEEP_PARAM_PREFIX}{k}": v for k, v in params.items()}}, attrs[ATTR_PARENT])
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("worker", worker)
    log.info("sweep %s: trial %d starts: %s", spec.name, trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
    log_params(client, run_id, params)
    ctx = TrialContext(spec, trial, params, to_overrides(params), run_id, attrs[ATTR_PARENT], attrs[ATTR_EXPERIMENT],
                       spec.resolved_tracking_uri, client, spec.resolved_output_dir / f"trial_{trial.number:04d}",
                       dict(attrs.get(ATTR_SETUP, {})))
    try:
        metrics = _final_metrics(trial_fn(ctx), spec.objective.metric)
    except optuna.TrialPruned as exc:
        finish_run(client, run_id, "KILLED", "PRUNED", f"pruned: {exc}")
        raise
    except Exception as exc:  # recorded FAIL (Optuna and MLflow) with its error; the study goes on
        if _stop_signal(exc):  # SIGTERM/SIGINT (a time limit, scancel): checkpointed; stop this worker too
            trial.set_user_attr("error", f"interrupted: {exc}")
            finish_run(client, run_id, "KILLED", "FAIL", f"interrupted: {exc}")
            raise WorkerInterrupted(str(exc), exc.exit_code) from exc
        trial.set_user_attr("error", error_text(exc))
        finish_run(client, run_id, "FAILED", "FAIL", error_text(exc))
        raise
    except BaseException:  # KeyboardInterrupt / SystemExit: record, then stop this worker
        trial.set_user_attr("error", "interrupted")
        finish_run(client, run_id, "KILLED", "FAIL", "interrupted")
        raise
    logged = client.get_run(run_id).data.metrics
    log_metrics(client, run_id, {k: v for k, v in metrics.items() if k not in logged})
    if not _still_running(trial):  # declared dead by another worker (and queued again): it is not ours to finish
        finish_run(client, run_id, "KILLED", "FAIL", DISCARDED)
        raise RuntimeError(f"trial {trial.number}: {DISCARDED}")
    finish_run(client, run_id, "FINISHED", "COMPLETE")
    log.info("sweep %s: trial %d finished: %s = %.6g", spec.name, trial.number, spec.objective.metric,
             metrics[spec.objective.metric])
    return metrics[spec.objective.metric]


def _stop_signal(exc: Exception) -> bool:
    """Training in this process stopped on a signal (`training.interrupt.TrainingInterrupted`): the worker
    stops as well instead of starting the next trial in the few seconds before SLURM's SIGKILL."""
    if "illada_lightning.training.interrupt" not in sys.modules:  # no in-process training ran
        return False
    from ..training.interrupt import TrainingInterrupted

    return isinstance(exc, TrainingInterrupted)


def _still_running(trial: optuna.Trial) -> bool:
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(t.number == trial.number for t in running)


# Workers ---------------------------------------------------------------------------------------------------------
def worker_loop(spec: SweepSpec, trial_fn: TrialFn | str | None = None, worker_index: int = 0,
                max_trials: int | None = None, poll_s: float | None = None) -> int:
    """Run trials (`study.optimize`, one at a time) until none is left or `max_trials` ran. Returns trials run.

    "Is there work? then ask" runs under the study's lock (`database.study_lock`: one for launchers on every
    host), released as the objective starts, so workers never start more trials than the budget (nor, with
    retries queued, a grid point twice)."""
    fn = resolve_trial_fn(spec, trial_fn)
    study = open_study(spec, worker_index)
    worker = f"{socket.gethostname()}:{os.getpid()}:{worker_index}"
    poll_s = poll_s if poll_s is not None else min(spec.heartbeat_s, 5)
    ran = 0
    while max_trials is None or ran < max_trials:
        with _lock(spec) as lock:
            fail_dead_trials(study)  # a dead worker's trial: FAIL, KILLED in MLflow, queued again
            work = pending_work(study, spec)
            if work == "run":
                _optimize_one(study, spec, fn, worker, lock)
        if work == "done":
            break
        if work == "wait":  # other workers are busy; if one dies its trial comes back, so keep watching
            time.sleep(poll_s)
            continue
        ran += 1
    return ran


def _optimize_one(study: optuna.Study, spec: SweepSpec, fn: TrialFn, worker: str, lock) -> None:
    def objective(trial: optuna.Trial) -> float:
        lock.release()  # the trial is claimed: let other workers ask
        return run_trial(trial, spec, fn, worker)

    try:
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
    except ValueError as exc:  # Optuna refuses to tell a trial another worker already declared dead
        if "Cannot tell" not in str(exc):
            raise
        log.warning(DISCARDED)


def _lock(spec: SweepSpec):
    return study_lock(spec.resolved_storage, spec.resolved_study_name, spec.resolved_output_dir)


def _worker_process(spec: SweepSpec, trial_fn: TrialFn | str | None, worker_index: int,
                    max_trials: int | None, log_level: int | None = None) -> None:
    if log_level is not None:  # a spawned process starts bare: log as the launching command does
        configure_logging(log_level)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker_loop(spec, trial_fn, worker_index, max_trials)


def _sweep_tags(spec: SweepSpec) -> dict[str, str]:
    return {SWEEP_NAME_TAG: spec.name, SWEEP_STUDY_TAG: spec.resolved_study_name}


# Preparation -----------------------------------------------------------------------------------------------------
def _ensure_parent_run(study: optuna.Study, spec: SweepSpec) -> tuple[str, str]:
    client = client_for(spec.resolved_tracking_uri)
    experiment_id = ensure_experiment(client, spec.resolved_mlflow_experiment, spec.resolved_tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT)
    if run_exists(client, parent):
        client.update_run(parent, status="RUNNING")
        return parent, experiment_id
    parent = create_run(client, experiment_id, f"sweep-{spec.name}", "parent", {
        **_sweep_tags(spec), "sweep.mode": spec.mode, "sweep.space": json.dumps(list(spec.space)),
        "sweep.objective": spec.objective.metric, "sweep.direction": spec.objective.direction,
        "sweep.sampler": spec.sampler.type, "sweep.storage": spec.resolved_storage})
    log_params(client, parent, {f"sweep.{k}": v for k, v in flatten(dataclasses.asdict(spec)).items()})
    study.set_user_attr(ATTR_PARENT, parent)
    study.set_user_attr(ATTR_EXPERIMENT, experiment_id)
    return parent, experiment_id


def _run_setup(study: optuna.Study, spec: SweepSpec, trial_fn: TrialFn, parent: str, experiment_id: str) -> None:
    """eval_only / per_epoch: train (or locate) the one checkpoint every trial reuses, once per study."""
    setup_fn = getattr(trial_fn, "setup", None)
    if setup_fn is None or ATTR_SETUP in study.user_attrs:
        return
    client = client_for(spec.resolved_tracking_uri)
    run_id = create_run(client, experiment_id, f"{spec.name}-base", "base", _sweep_tags(spec), parent)
    ctx = SetupContext(spec, run_id, parent, experiment_id, spec.resolved_tracking_uri, client,
                       spec.resolved_output_dir / "base")
    try:
        result = setup_fn(ctx)
    except BaseException as exc:
        finish_run(client, run_id, "FAILED", "FAIL", error_text(exc))
        client.set_terminated(parent, status="FAILED")  # a relaunch retries the setup and reopens the parent
        if not isinstance(exc, Exception):
            raise
        raise SweepError(f"the sweep's setup (training the shared checkpoint) failed: {exc}") from exc
    client.set_terminated(run_id, status="FINISHED")
    study.set_user_attr(ATTR_SETUP, json.loads(json.dumps(result or {}, default=str)))


def prepare_study(spec: SweepSpec, trial_fn: TrialFn) -> str:
    """Create or load the study (once, under its lock), its MLflow parent run, re-queue failed parameter sets
    and run the mode's one-off setup. Returns the parent run id."""
    with _lock(spec):
        study = open_study(spec)
        if study.direction.name.lower() != spec.objective.direction:
            raise SweepError(
                f"study {spec.resolved_study_name!r} in {mask_password(spec.resolved_storage)} exists with direction "
                f"{study.direction.name.lower()}; use another study_name for direction {spec.objective.direction}")
        stored = study.user_attrs.get(ATTR_SPACE)
        if stored is not None and stored != space_signature(spec):
            raise SweepError(
                f"study {spec.resolved_study_name!r} in {mask_password(spec.resolved_storage)} was created with another search "
                f"space ({stored}); use another study_name (or the original space) to resume")
        study.set_user_attr(ATTR_SPACE, space_signature(spec))
        parent, experiment_id = _ensure_parent_run(study, spec)
        fail_dead_trials(study)
        requeue_failed(study, spec)
        _run_setup(study, spec, trial_fn, parent, experiment_id)
    return parent


# Entry point -----------------------------------------------------------------------------------------------------
def summarize(spec: SweepSpec, parent_run_id: str) -> SweepResult:
    study = optuna.load_study(study_name=spec.resolved_study_name, storage=open_storage(spec.resolved_storage))
    trials_ = study.get_trials(deepcopy=False)
    count = lambda *states: sum(t.state in states for t in trials_)  # noqa: E731
    complete = [t for t in trials_ if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = (max if spec.objective.direction == "maximize" else min)(complete, key=lambda t: t.value)
    return SweepResult(
        study_name=spec.resolved_study_name, storage=mask_password(spec.resolved_storage),
        tracking_uri=mask_password(spec.resolved_tracking_uri),
        parent_run_id=parent_run_id, n_complete=len(complete), n_failed=count(TrialState.FAIL),
        n_pruned=count(TrialState.PRUNED),
        n_pending=count(TrialState.WAITING, TrialState.RUNNING) + not_started(trials_, spec),
        best_value=best.value if best else None, best_params=dict(best.params) if best else None,
        errors=[(t.number, t.user_attrs.get("error", "worker died (no heartbeat)")) for t in trials_
                if t.state == TrialState.FAIL],
        objective=spec.objective.metric, mlflow_experiment=spec.resolved_mlflow_experiment,
    )


def _finish_parent(spec: SweepSpec, result: SweepResult) -> None:
    client = client_for(spec.resolved_tracking_uri)
    tags = {"sweep.n_complete": result.n_complete, "sweep.n_failed": result.n_failed,
            "sweep.n_pruned": result.n_pruned}
    if result.best_params is not None:
        tags["sweep.best_params"] = json.dumps(result.best_params, sort_keys=True)
        log_metrics(client, result.parent_run_id, {"sweep/best_value": result.best_value})
    set_tags(client, result.parent_run_id, tags)
    if result.n_pending == 0:
        client.set_terminated(result.parent_run_id, status="FINISHED")


def run_sweep(spec: SweepSpec, trial_fn: TrialFn | str | None = None, *, n_workers: int | None = None,
              max_trials: int | None = None) -> SweepResult:
    """Validate, prepare and run a sweep with `n_workers` processes (default `spec.n_workers`).

    `trial_fn` replaces the built-in trial of the mode (tests inject a fake one); `max_trials` caps the trials
    *this launch* runs per worker (the rest run at a later launch).
    """
    fn = resolve_trial_fn(spec, trial_fn)
    validate_sweep(spec, getattr(fn, "declared_metrics", None))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec.resolved_output_dir.mkdir(parents=True, exist_ok=True)
    parent = prepare_study(spec, fn)
    workers = n_workers or spec.n_workers
    try:
        if workers == 1:
            worker_loop(spec, fn, 0, max_trials)
        else:
            # spawn, not fork: forked children would share the parent's SQLite connections and MLflow client state.
            mp = multiprocessing.get_context("spawn")
            procs = [mp.Process(target=_worker_process, args=(spec, fn, i, max_trials, configured_level()))
                     for i in range(workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode != 0]
            if bad:
                raise RuntimeError(f"{len(bad)} sweep worker process(es) exited with codes {bad}")
    except BaseException:
        client_for(spec.resolved_tracking_uri).set_terminated(parent, status="KILLED")
        raise
    result = summarize(spec, parent)
    _finish_parent(spec, result)
    return result
