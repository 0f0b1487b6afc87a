"""Run a sweep: prepare the study once (`study.prepare_study`), then let worker processes claim trials from
it until none are left; each trial runs inside its MLflow run nested under the sweep's parent run.

    result = run_sweep(load_sweep_spec("sweeps/scoring_rule.yaml"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from .context import TrialContext, TrialFn
from .space import suggest, to_overrides
from .spec import SweepSpec
from .storage import Heartbeat, open_storage
from .study import (
    ATTR_EXPERIMENT,
    ATTR_PARENT,
    ATTR_SETUP,
    budget_left,
    fail_stale_trials,
    open_study,
    pop_waiting,
    prepare_study,
)
from .tracking import client_for, create_child_run, error_text, log_metrics, log_params, set_tags
from .validate import SweepError, import_object, validate_sweep


@dataclass
class SweepResult:
    study_name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    n_complete: int
    n_failed: int
    n_pruned: int
    n_pending: int  # WAITING or RUNNING: the sweep was interrupted (or other workers are still busy)
    best_value: float | None
    best_params: dict[str, Any] | None
    errors: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (trial number, error) of FAILs


# Trial functions --------------------------------------------------------------------------------------------------
def resolve_trial_fn(spec: SweepSpec, trial_fn: TrialFn | str | None) -> TrialFn:
    """The injected function, else `spec.trial_fn`, else the built-in trial of the sweep's mode."""
    if callable(trial_fn):
        return trial_fn
    ref = trial_fn or spec.trial_fn
    if ref:
        fn = import_object(ref)
        if not callable(fn):
            raise SweepError(f"trial_fn {ref!r} is not callable")
        return fn
    from . import trials

    return {"train": trials.train_trial, "eval_only": trials.eval_only_trial, "per_epoch": trials.per_epoch_trial}[
        spec.mode
    ]


# Workers -----------------------------------------------------------------------------------------------------------
def _final_metrics(out: Any, objective: str) -> dict[str, float]:
    if isinstance(out, dict):
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(out, (int, float)):
        return {objective: float(out)}
    raise TypeError(f"a trial function must return a dict of metrics or a number, got {type(out).__name__}")


def run_one_trial(
    study: optuna.Study, storage: Any, trial: optuna.Trial, spec: SweepSpec, trial_fn: TrialFn, worker: str
) -> TrialState:
    """Run `trial_fn` for one claimed trial inside its nested MLflow run and tell Optuna the outcome."""
    client = client_for(spec.resolved_tracking_uri)
    parent = study.user_attrs[ATTR_PARENT]
    experiment_id = study.user_attrs[ATTR_EXPERIMENT]
    with Heartbeat(storage, trial._trial_id, spec.heartbeat_s):
        params = suggest(trial, spec.space)
        run_id = create_child_run(
            client, experiment_id, parent, f"{spec.name}-trial-{trial.number}", "trial",
            {"sweep.name": spec.name, "sweep.study": spec.resolved_study_name, "sweep.trial_number": trial.number,
             "sweep.worker": worker, **{f"sweep.param.{k}": v for k, v in params.items()}},
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", worker)
        log_params(client, run_id, params)
        out_dir = spec.resolved_output_dir / f"trial_{trial.number:04d}"
        ctx = TrialContext(spec, trial, params, to_overrides(params), run_id, parent, experiment_id,
                           spec.resolved_tracking_uri, client, out_dir, dict(study.user_attrs.get(ATTR_SETUP, {})))
        try:
            metrics = _final_metrics(trial_fn(ctx), spec.objective.metric)
            if spec.objective.metric not in metrics:
                raise KeyError(f"objective metric {spec.objective.metric!r} was not returned by the trial "
                               f"(it returned {sorted(metrics)})")
            value = metrics[spec.objective.metric]
            if not math.isfinite(value):
                raise ValueError(f"objective {spec.objective.metric} is {value}")
        except optuna.TrialPruned as exc:
            set_tags(client, run_id, {"sweep.state": "PRUNED", "sweep.pruned": str(exc)})
            client.set_terminated(run_id, status="KILLED")
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        except Exception as exc:
            # A crashing trial is recorded FAILED (Optuna and MLflow) with its error; the study goes on.
            text = error_text(exc)
            trial.set_user_attr("error", text)
            set_tags(client, run_id, {"sweep.state": "FAIL", "sweep.error": text})
            client.set_terminated(run_id, status="FAILED")
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        except BaseException:  # KeyboardInterrupt / SystemExit: record, then stop this worker
            trial.set_user_attr("error", "interrupted")
            set_tags(client, run_id, {"sweep.state": "FAIL", "sweep.error": "interrupted"})
            client.set_terminated(run_id, status="KILLED")
            study.tell(trial, state=TrialState.FAIL)
            raise
        logged = client.get_run(run_id).data.metrics
        log_metrics(client, run_id, {k: v for k, v in metrics.items() if k not in logged})
        set_tags(client, run_id, {"sweep.state": "COMPLETE"})
        client.set_terminated(run_id, status="FINISHED")
        study.tell(trial, value)
        return TrialState.COMPLETE


def worker_loop(spec: SweepSpec, trial_fn: TrialFn | str | None = None, worker_index: int = 0,
                max_trials: int | None = None, poll_s: float | None = None) -> int:
    """Claim and run trials until the study has nothing left (or `max_trials` ran). Returns trials run."""
    fn = resolve_trial_fn(spec, trial_fn)
    study, storage = open_study(spec, worker_index)
    worker = f"{socket.gethostname()}:{os.getpid()}:{worker_index}"
    poll_s = poll_s if poll_s is not None else min(spec.heartbeat_s, 5)
    ran = 0
    while max_trials is None or ran < max_trials:
        fail_stale_trials(study)  # a dead worker's trial goes back into the queue
        trial_id = pop_waiting(study)
        if trial_id is not None:
            trial = optuna.trial.Trial(study, trial_id)
        elif budget_left(study, spec) > 0:
            trial = study.ask()
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            time.sleep(poll_s)  # other workers are busy; if one dies its trial is re-queued, so wait
            continue
        else:
            break
        run_one_trial(study, storage, trial, spec, fn, worker)
        ran += 1
    return ran


def _worker_process(spec: SweepSpec, trial_fn: TrialFn | str | None, worker_index: int,
                    max_trials: int | None) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker_loop(spec, trial_fn, worker_index, max_trials)


# Entry point -------------------------------------------------------------------------------------------------------
def summarize(spec: SweepSpec, parent_run_id: str) -> SweepResult:
    study = optuna.load_study(study_name=spec.resolved_study_name, storage=open_storage(spec.resolved_storage))
    trials = study.get_trials(deepcopy=False)
    count = lambda *states: sum(t.state in states for t in trials)  # noqa: E731
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = (max if spec.objective.direction == "maximize" else min)(complete, key=lambda t: t.value)
    return SweepResult(
        study_name=spec.resolved_study_name, storage=spec.resolved_storage, tracking_uri=spec.resolved_tracking_uri,
        parent_run_id=parent_run_id, n_complete=len(complete), n_failed=count(TrialState.FAIL),
        n_pruned=count(TrialState.PRUNED), n_pending=count(TrialState.WAITING, TrialState.RUNNING),
        best_value=best.value if best else None, best_params=dict(best.params) if best else None,
        errors=[(t.number, t.user_attrs.get("error", "?")) for t in trials if t.state == TrialState.FAIL],
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


def run_sweep(
    spec: SweepSpec,
    trial_fn: TrialFn | str | None = None,
    *,
    n_workers: int | None = None,
    max_trials: int | None = None,
) -> SweepResult:
    """Validate, prepare and run a sweep with `n_workers` processes (default `spec.n_workers`).

    `trial_fn` replaces the built-in trial of the mode (tests inject a fake one); `max_trials` caps the trials
    *this launch* runs per worker (the rest stay queued for a later launch).
    """
    fn = resolve_trial_fn(spec, trial_fn)
    validate_sweep(spec, getattr(fn, "declared_metrics", None))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec.resolved_output_dir.mkdir(parents=True, exist_ok=True)
    parent = prepare_study(spec, fn)
    workers = n_workers or spec.n_workers
    if workers == 1:
        try:
            worker_loop(spec, fn, 0, max_trials)
        except KeyboardInterrupt:
            client_for(spec.resolved_tracking_uri).set_terminated(parent, status="KILLED")
            raise
    else:
        # spawn, not fork: forked children would share the parent's SQLite connections and MLflow client state.
        mp = multiprocessing.get_context("spawn")
        procs = [mp.Process(target=_worker_process, args=(spec, fn, i, max_trials)) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} sweep worker process(es) exited with codes {bad}")
    result = summarize(spec, parent)
    _finish_parent(spec, result)
    return result
