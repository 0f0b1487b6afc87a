"""The study in its database: open it, queue the grid, re-queue dead or failed trials, claim trials.

Why grid trials are *enqueued* instead of sampled: Optuna's GridSampler picks grid points independently in
every worker and may run one point twice under parallel workers. Here the launcher writes every missing grid
point into the study as a WAITING trial (under a file lock, so two launchers cannot both do it), and workers
claim them; claiming is one atomic state change WAITING→RUNNING in the database, so no point runs twice. The
same queue makes a relaunch resume: COMPLETE/PRUNED points are skipped, FAIL points and points whose worker
died (RUNNING without heartbeat) are queued again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import warnings
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from ..config import flatten
from .context import SetupContext, TrialFn
from .space import grid_points, params_key
from .spec import SweepSpec
from .storage import open_storage, preparation_lock
from .tracking import (
    client_for,
    create_child_run,
    create_parent_run,
    ensure_experiment,
    error_text,
    log_params,
    run_exists,
    set_tags,
)
from .validate import SweepError

LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
ATTR_PARENT = "mlflow_parent_run_id"
ATTR_EXPERIMENT = "mlflow_experiment_id"
ATTR_SPACE = "sweep_space"
ATTR_SETUP = "sweep_setup"


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    # Every worker gets its own seed: equal seeds would make parallel TPE workers propose identical points.
    seed = spec.sampler.seed + worker_index
    kind = spec.sampler.type
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    # grid: every trial is enqueued with fixed parameters, the sampler is never consulted
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.pruner.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner.n_startup_trials, n_warmup_steps=spec.pruner.n_warmup_steps
        )
    return optuna.pruners.NopPruner()


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark RUNNING trials without a recent heartbeat FAIL (their worker died); `requeue_stale` reruns them.

    Optuna never calls a RUNNING trial stale when it has *no* heartbeat row (its worker died between claiming
    it and the first beat); such a trial older than the grace period gets a beat on its behalf here, so it goes
    stale one grace period later instead of blocking the sweep forever.
    """
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if interval:
        now = datetime.datetime.now()
        beaten = set(_trial_ids_with_heartbeat(storage))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > 2 * interval
            if old and t._trial_id not in beaten:
                storage.record_heartbeat(t._trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna flags the heartbeat API experimental
        optuna.storages.fail_stale_trials(study)


def _trial_ids_with_heartbeat(storage: Any) -> list[int]:
    from optuna.storages._rdb import models

    backend = getattr(storage, "_backend", storage)
    with backend.scoped_session() as session:
        return [row.trial_id for row in session.query(models.TrialHeartbeatModel.trial_id).all()]


def requeue_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale callback: the trial's worker died; run its parameters again (only the process that
    marked it FAIL calls this, so it is queued once)."""
    if trial.params and not _is_covered(study, trial.params):
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def open_study(spec: SweepSpec, worker_index: int = 0) -> tuple[optuna.Study, Any]:
    storage = open_storage(spec.resolved_storage, spec.heartbeat_s, on_stale=requeue_stale)
    study = optuna.create_study(
        study_name=spec.resolved_study_name,
        storage=storage,
        direction=spec.objective.direction,
        sampler=make_sampler(spec, worker_index),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    return study, storage


def _space_signature(spec: SweepSpec) -> str:
    return json.dumps({k: dataclasses.asdict(v) for k, v in spec.space.items()}, sort_keys=True)


def _covered_keys(study: optuna.Study) -> set[str]:
    """Parameter sets that need no (new) run: done, running or already queued."""
    keys = set()
    for t in study.get_trials(deepcopy=False, states=LIVE_STATES):
        params = t.system_attrs.get("fixed_params", t.params)
        keys.add(params_key(params))
    return keys


def _is_covered(study: optuna.Study, params: dict) -> bool:
    return params_key(params) in _covered_keys(study)


def _queue_missing(study: optuna.Study, spec: SweepSpec) -> int:
    """Enqueue the grid points (or failed parameter sets) that have no live trial. Returns how many."""
    covered = _covered_keys(study)
    todo: list[tuple[dict, dict]] = []
    if spec.sampler.type == "grid":
        points = grid_points(spec.space)[: spec.n_trials]
        todo = [(p, {}) for p in points if params_key(p) not in covered]
    else:
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if t.params and params_key(t.params) not in covered:
                todo.append((t.params, {"retry_of": t.number}))
                covered.add(params_key(t.params))
    for params, attrs in todo:
        study.enqueue_trial(params, user_attrs=attrs)
    return len(todo)


def _ensure_parent_run(study: optuna.Study, spec: SweepSpec) -> tuple[str, str]:
    client = client_for(spec.resolved_tracking_uri)
    experiment_id = ensure_experiment(client, spec.resolved_mlflow_experiment, spec.resolved_tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT)
    if not run_exists(client, parent):
        parent = create_parent_run(
            client, experiment_id, spec.name, spec.resolved_study_name,
            {"sweep.mode": spec.mode, "sweep.space": json.dumps(list(spec.space)),
             "sweep.objective": spec.objective.metric, "sweep.direction": spec.objective.direction,
             "sweep.sampler": spec.sampler.type, "sweep.storage": spec.resolved_storage},
        )
        log_params(client, parent, {f"sweep.{k}": v for k, v in flatten(dataclasses.asdict(spec)).items()})
        study.set_user_attr(ATTR_PARENT, parent)
        study.set_user_attr(ATTR_EXPERIMENT, experiment_id)
    else:
        client.update_run(parent, status="RUNNING")
    return parent, experiment_id


def _run_setup(study: optuna.Study, spec: SweepSpec, trial_fn: TrialFn, parent: str, experiment_id: str) -> None:
    """eval_only / per_epoch: train (or locate) the one checkpoint every trial reuses, once per study."""
    setup_fn = getattr(trial_fn, "setup", None)
    if setup_fn is None or ATTR_SETUP in study.user_attrs:
        return
    client = client_for(spec.resolved_tracking_uri)
    run_id = create_child_run(client, experiment_id, parent, f"{spec.name}-base", "base",
                              {"sweep.name": spec.name, "sweep.study": spec.resolved_study_name})
    out_dir = spec.resolved_output_dir / "base"
    ctx = SetupContext(spec, run_id, parent, experiment_id, spec.resolved_tracking_uri, client, out_dir)
    try:
        result = setup_fn(ctx)
    except Exception as exc:
        set_tags(client, run_id, {"sweep.error": error_text(exc)})
        client.set_terminated(run_id, status="FAILED")
        client.set_terminated(parent, status="FAILED")  # a relaunch retries the setup and reopens the parent
        raise SweepError(f"the sweep's setup (training the shared checkpoint) failed: {exc}") from exc
    client.set_terminated(run_id, status="FINISHED")
    study.set_user_attr(ATTR_SETUP, json.loads(json.dumps(result or {}, default=str)))


def prepare_study(spec: SweepSpec, trial_fn: TrialFn) -> str:
    """Create or load the study, its MLflow parent run and its queue. Returns the parent run id."""
    with preparation_lock(spec.resolved_storage, spec.resolved_output_dir):
        study, _ = open_study(spec)
        if study.direction.name.lower() != spec.objective.direction:
            raise SweepError(
                f"study {spec.resolved_study_name!r} in {spec.resolved_storage} exists with direction "
                f"{study.direction.name.lower()}; use another study_name for direction {spec.objective.direction}"
            )
        signature = _space_signature(spec)
        stored = study.user_attrs.get(ATTR_SPACE)
        if stored is not None and stored != signature:
            raise SweepError(
                f"study {spec.resolved_study_name!r} in {spec.resolved_storage} was created with another search "
                f"space ({stored}); use another study_name (or the original space) to resume"
            )
        study.set_user_attr(ATTR_SPACE, signature)
        parent, experiment_id = _ensure_parent_run(study, spec)
        fail_stale_trials(study)
        _queue_missing(study, spec)
        _run_setup(study, spec, trial_fn, parent, experiment_id)
    return parent


def pop_waiting(study: optuna.Study) -> int | None:
    """Atomically claim one WAITING trial (retrying when another SQLite writer holds the lock)."""
    for attempt in range(20):
        try:
            for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                try:
                    if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                        if is_heartbeat_enabled(study._storage):  # at once: a worker may die before Heartbeat
                            study._storage.record_heartbeat(t._trial_id)
                        return t._trial_id
                except UpdateFinishedTrialError:
                    continue
            return None
        except StorageInternalError:  # "database is locked" between two claimers: try again
            time.sleep(0.05 * (attempt + 1))
    return None


def budget_left(study: optuna.Study, spec: SweepSpec) -> int:
    """Non-grid samplers: trials still to create (failed parameter sets count once, retried or not)."""
    if spec.sampler.type == "grid" or spec.n_trials is None:
        return 0
    covered = _covered_keys(study)
    live = len(study.get_trials(deepcopy=False, states=LIVE_STATES))
    uncovered_failures = {
        params_key(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if params_key(t.params) not in covered
    }
    return spec.n_trials - live - len(uncovered_failures)
