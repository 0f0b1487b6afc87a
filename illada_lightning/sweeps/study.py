"""The Optuna side of a sweep, on Optuna's own machinery: an RDB storage with its heartbeat, its samplers and
pruners, and `RetryHeartbeatStaleTrialCallback` for trials whose worker died.

- Storage: `sqlite:///<output_dir>/optuna.db` by default, any SQLAlchemy URL by option. Every worker beats for
  its running trial (Optuna's heartbeat thread); a RUNNING trial without a beat for `3 * heartbeat_s` is marked
  FAIL by `optuna.storages.fail_stale_trials`, its MLflow runs are closed KILLED, and Optuna's retry callback
  queues its parameters again (WAITING), so a relaunch or a live worker reruns it.
- Grid: Optuna's `GridSampler` gives grid point k to trial k (a retry keeps its point), so no point runs twice.
- Two fixes Optuna leaves to its user: (1) pysqlite opens a transaction only at the first write, so two workers
  could both read one WAITING trial and both claim it (then both "finish" it); SQLite transactions here begin
  IMMEDIATE, which makes Optuna's read-check-write of a trial state atomic. (2) Creating a store is not safe
  from two processes at once (MLflow: `duplicate column name`), and "is there work left? then ask()" is two
  steps: both run under the study's lock, held only for that moment (`database.py`: a PostgreSQL advisory lock
  shared by launchers on every host, a file lock beside a SQLite file).
- A database server (PostgreSQL): connections are tested before use and calls retried across a restart
  (`database.ReconnectingRDBStorage`); URLs in messages have their password masked.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from ..redact import mask_password
from ..runs import sqlite_path
from .database import ReconnectingRDBStorage, creation_lock, server_engine_kwargs
from .space import param_values, params_key
from .spec import PrunerSpec, SweepSpec
from .tracking import close_runs_of_trial

SQLITE_BUSY_TIMEOUT_S = 120  # a worker waits this long for another one's write before giving up
GRACE_HEARTBEATS = 3  # missed beats before a RUNNING trial counts as dead (margin for a loaded machine)
LIVE_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
RETRY_OF = "failed_trial"  # system attr RetryHeartbeatStaleTrialCallback writes on a retried trial


class StorageError(RuntimeError):
    """The Optuna storage URL cannot be opened."""


def _begin_immediate(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class _CloseAndRetry:
    """Heartbeat-stale callback: close the dead trial's MLflow runs KILLED, then Optuna's retry."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental class
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        grace = GRACE_HEARTBEATS * self.spec.heartbeat_s
        close_runs_of_trial(self.spec, trial, f"worker died: no heartbeat for {grace} s")
        self.retry(study, trial)


def open_storage(url: str, spec: SweepSpec | None = None) -> RDBStorage:
    """Open (and create) the study database, or raise StorageError saying why it cannot be opened."""
    engine_kwargs = server_engine_kwargs(url)
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot open Optuna storage {url!r}: cannot create {path.parent} ({exc})") from None
        # autocommit driver + explicit BEGIN IMMEDIATE (SQLAlchemy's pysqlite recipe), see the module doc
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "isolation_level": None}
    beat = spec.heartbeat_s if spec is not None else None
    storage_class = RDBStorage if path is not None else ReconnectingRDBStorage
    # Two launchers on a fresh database would both create its schema (alembic's version row collides):
    # creation happens under a lock of its own (not the study's lock, which a caller may already hold).
    try:
        with creation_lock(url), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat arguments are flagged experimental
            storage = storage_class(url, engine_kwargs=engine_kwargs, heartbeat_interval=beat,
                                    grace_period=GRACE_HEARTBEATS * beat if beat else None,
                                    heartbeat_stale_trial_callback=_CloseAndRetry(spec) if spec is not None else None)
    except Exception as exc:  # bad dialect, missing driver, unreachable server, unwritable file, ...
        hint = _driver_hint(exc)
        raise StorageError(mask_password(f"cannot open Optuna storage {url!r}: {type(exc).__name__}: {exc}{hint}")
                           ) from None
    if path is not None:
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


def _driver_hint(exc: Exception) -> str:
    if isinstance(exc, ModuleNotFoundError) and "psycopg" in str(exc):
        return ' (the PostgreSQL driver: pip install "illada-lightning[cluster]")'
    return ""


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    # Every worker gets its own seed: equal seeds would make parallel TPE workers propose identical points.
    seed = spec.sampler.seed + worker_index
    kind = spec.sampler.type
    if kind == "grid":  # the seed shuffles grid order: every worker needs the same one (trial k -> point k)
        return optuna.samplers.GridSampler({k: param_values(p) for k, p in spec.space.items()},
                                           seed=spec.sampler.seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(pruner: PrunerSpec) -> optuna.pruners.BasePruner:
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.n_startup_trials,
                                           n_warmup_steps=pruner.n_warmup_steps)
    return optuna.pruners.NopPruner()


def open_study(spec: SweepSpec, worker_index: int = 0) -> optuna.Study:
    return optuna.create_study(
        study_name=spec.resolved_study_name, storage=open_storage(spec.resolved_storage, spec),
        direction=spec.objective.direction, sampler=make_sampler(spec, worker_index), pruner=make_pruner(spec.pruner),
        load_if_exists=True,
    )


def space_signature(spec: SweepSpec) -> str:
    return json.dumps({k: dataclasses.asdict(v) for k, v in spec.space.items()}, sort_keys=True)


def budget(spec: SweepSpec) -> int:
    """Trials to start fresh (retries come on top): the grid's size, or `n_trials`."""
    if spec.sampler.type == "grid":
        size = 1
        for param in spec.space.values():
            size *= len(param_values(param))
        return min(size, spec.n_trials or size)
    return spec.n_trials or 1


def fail_dead_trials(study: optuna.Study) -> None:
    """Optuna's `fail_stale_trials`: RUNNING trials without a recent heartbeat become FAIL (and are retried)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flagged experimental
        optuna.storages.fail_stale_trials(study)


def not_started(trials: list[FrozenTrial], spec: SweepSpec) -> int:
    """Budget left: fresh trials still to start (a retry of a failed trial does not count)."""
    return max(0, budget(spec) - sum(RETRY_OF not in t.system_attrs for t in trials))


def pending_work(study: optuna.Study, spec: SweepSpec) -> str:
    """"run" (a queued retry or budget left), "wait" (only other workers' trials are running) or "done"."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return "run"
    if not_started(trials, spec) > 0:
        return "run"
    return "wait" if any(t.state == TrialState.RUNNING for t in trials) else "done"


def requeue_failed(study: optuna.Study, spec: SweepSpec) -> int:
    """On relaunch: queue once more every failed parameter set that no live trial covers (Optuna's retry
    callback, as for a dead worker's trial). Returns how many."""
    covered = {params_key(t.params) for t in study.get_trials(deepcopy=False, states=LIVE_STATES)}
    retry = _CloseAndRetry(spec).retry
    queued = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.params and params_key(trial.params) not in covered:
            retry(study, trial)
            covered.add(params_key(trial.params))
            queued += 1
    return queued
