"""Sweep machinery with the injected fake trial (tests/sweep_fakes.py): grid, nesting, resume,
failures, parallel workers. Each test has its own Optuna study; the MLflow store is shared per module
(creating one costs seconds), each test in its own MLflow experiment."""

from __future__ import annotations

import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from illada_lightning.sweeps import ParamSpec, SweepSpec, run_sweep
from illada_lightning.sweeps.runner import WorkerInterrupted
from illada_lightning.sweeps.spec import EvaluationSpec, ObjectiveSpec, PrunerSpec, SamplerSpec
from illada_lightning.sweeps.study import open_storage
from tests.sweep_fakes import fake_metric

REPO = Path(__file__).resolve().parents[1]
TOY_SCHEMA = "tests.sweep_fakes:ToyExperimentConfig"
TOY_EVAL = EvaluationSpec(schema="tests.sweep_fakes:ToyEvalConfig")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_spec(tmp_path: Path, tracking_uri: str, name: str, rules=("confidence", "likelihood"), **kw) -> SweepSpec:
    spec = SweepSpec(
        name=name,
        schema=TOY_SCHEMA,
        evaluation=TOY_EVAL,
        space={"sft.epochs": ParamSpec(type="categorical", choices=[1, 2]),
               "eval.scoring_rule": ParamSpec(type="categorical", choices=list(rules))},
        objective=ObjectiveSpec(metric="eval/toy/acc", direction="maximize"),
        output_dir=str(tmp_path / name),
        tracking_uri=tracking_uri,
        trial_fn="tests.sweep_fakes:fake_trial",
        **kw,
    )
    spec.validate()
    return spec


def child_runs(tracking_uri: str, parent_run_id: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return sorted(runs, key=lambda r: int(r.data.tags["sweep.trial_number"]))


def load_trials(spec: SweepSpec):
    study = optuna.load_study(study_name=spec.resolved_study_name, storage=open_storage(spec.resolved_storage))
    return study.get_trials()


def trial_states(db: Path) -> list[str]:
    """Trial states read with plain sqlite3 (cheap to poll while another process writes)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # tables not created yet
        return []


def grid_params(run) -> tuple:
    return int(run.data.params["sft.epochs"]), run.data.params["eval.scoring_rule"]


def test_two_by_two_grid_gives_four_nested_runs_with_params_and_metrics(tmp_path, tracking_uri):
    spec = make_spec(tmp_path, tracking_uri, "grid")
    result = run_sweep(spec)
    assert (result.n_complete, result.n_failed, result.n_pending) == (4, 0, 0)
    runs = child_runs(tracking_uri, result.parent_run_id)
    assert len(runs) == 4
    assert sorted(grid_params(r) for r in runs) == [(1, "confidence"), (1, "likelihood"), (2, "confidence"),
                                                     (2, "likelihood")]
    for run in runs:
        epochs, rule = grid_params(run)
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep.role"] == "trial"
        assert run.data.tags["sweep.param.eval.scoring_rule"] == rule
        assert run.data.metrics["eval/toy/acc"] == pytest.approx(
            fake_metric({"sft.epochs": epochs, "eval.scoring_rule": rule}))
    # best = 2 epochs with confidence scoring: 0.5 + 0.02 + 0.05
    assert result.best_value == pytest.approx(0.57)
    assert result.best_params == {"sft.epochs": 2, "eval.scoring_rule": "confidence"}
    parent = MlflowClient(tracking_uri).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.role"] == "parent"
    # A relaunch of a finished sweep runs nothing and keeps the same parent run.
    again = run_sweep(spec)
    assert again.parent_run_id == result.parent_run_id
    assert len(load_trials(spec)) == 4 and len(child_runs(tracking_uri, result.parent_run_id)) == 4


def test_interrupted_sweep_resumes_and_runs_only_the_missing_trials(tmp_path, tracking_uri):
    spec = make_spec(tmp_path, tracking_uri, "resume")
    first = run_sweep(spec, max_trials=1)  # stops after one trial, the rest stay queued
    assert (first.n_complete, first.n_pending) == (1, 3)
    done_first = [t.params for t in load_trials(spec) if t.state == TrialState.COMPLETE]
    second = run_sweep(spec)
    assert second.parent_run_id == first.parent_run_id
    trials = load_trials(spec)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].params == done_first[0]  # trial 0 was not rerun
    runs = child_runs(tracking_uri, first.parent_run_id)
    assert len(runs) == 4 and len({grid_params(r) for r in runs}) == 4


def test_failing_trial_is_recorded_failed_and_the_study_goes_on(tmp_path, tracking_uri):
    spec = make_spec(tmp_path, tracking_uri, "fail", rules=("confidence", "raise"))
    result = run_sweep(spec)
    assert (result.n_complete, result.n_failed) == (2, 2)
    failed = [t for t in load_trials(spec) if t.state == TrialState.FAIL]
    assert {t.params["eval.scoring_rule"] for t in failed} == {"raise"}
    assert all("fake trial crashed on purpose" in t.user_attrs["error"] for t in failed)
    runs = child_runs(tracking_uri, result.parent_run_id)
    status = {grid_params(r): r.info.status for r in runs}
    assert status == {(1, "confidence"): "FINISHED", (2, "confidence"): "FINISHED",
                      (1, "raise"): "FAILED", (2, "raise"): "FAILED"}
    assert all("RuntimeError" in r.data.tags["sweep.error"] for r in runs if r.info.status == "FAILED")
    # Relaunching retries only the failed grid points (they still fail here), never the complete ones.
    run_sweep(spec)
    trials = load_trials(spec)
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 6


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study_without_duplicates(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("ILLADA_FAKE_SLEEP_S", "0.2")
    spec = make_spec(tmp_path, tracking_uri, "workers", rules=("confidence", "likelihood", "confidence2"))
    spec.space["eval.scoring_rule"] = ParamSpec(type="categorical", choices=["confidence", "likelihood"])
    spec.space["sft.epochs"] = ParamSpec(type="int", low=1, high=3)  # 3 x 2 = 6 points
    result = run_sweep(spec, n_workers=2)
    trials = load_trials(spec)
    keys = [(t.params["sft.epochs"], t.params["eval.scoring_rule"]) for t in trials]
    assert len(trials) == 6 and len(set(keys)) == 6
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    assert len(child_runs(tracking_uri, result.parent_run_id)) == 6


@pytest.mark.slow
def test_killed_sweep_resumes_the_trial_its_dead_worker_held(tmp_path, tracking_uri):
    """SIGKILL mid-trial leaves a RUNNING trial; the relaunch finds it stale (no heartbeat) and reruns it."""
    spec = make_spec(tmp_path, tracking_uri, "killed", heartbeat_s=1)
    spec_file = tmp_path / "killed.yaml"
    from illada_lightning.config import to_yaml

    spec_file.write_text(to_yaml(spec))
    env = {**os.environ, "ILLADA_FAKE_HANG_FROM": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.run", str(spec_file)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    db = Path(spec.resolved_storage[len("sqlite:///"):])
    try:
        deadline = time.time() + 150  # the subprocess imports torch (via illada_lightning): slow on a busy machine
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if trial_states(db).count("COMPLETE") == 1 and "RUNNING" in trial_states(db):
                break
        else:
            pytest.fail(f"the sweep subprocess did not reach its second trial:\n{log.read_text()[-3000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert trial_states(db) == ["COMPLETE", "RUNNING"]
    client = MlflowClient(tracking_uri)
    dead_run = load_trials(spec)[1].user_attrs["mlflow_run_id"]
    assert client.get_run(dead_run).info.status == "RUNNING"  # what kill -9 leaves behind
    result = run_sweep(spec)  # waits out the grace period (3 heartbeats); Optuna fails and re-queues the trial
    trials = load_trials(spec)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1
    assert trials[1].state == TrialState.FAIL and result.n_pending == 0
    completed = [(t.params["sft.epochs"], t.params["eval.scoring_rule"]) for t in trials
                 if t.state == TrialState.COMPLETE]
    assert len(set(completed)) == 4
    assert (trials[1].params in [t.params for t in trials[2:]])  # the retry ran the dead trial's point
    dead = client.get_run(dead_run)
    assert dead.info.status == "KILLED" and "no heartbeat" in dead.data.tags["sweep.error"]
    assert "no heartbeat" in dict(result.errors)[1]


def pruned_above(ctx):
    """Reports one intermediate value; the pruner stops trials whose epochs exceed the first trial's."""
    ctx.report(float(ctx.params["sft.epochs"]), step=1)
    return {"val/loss": float(ctx.params["sft.epochs"])}


pruned_above.declared_metrics = ("val/loss",)


def test_tpe_search_runs_n_trials_and_median_pruning_marks_trials_pruned(tmp_path, tracking_uri):
    spec = SweepSpec(
        name="search", schema=TOY_SCHEMA, evaluation=TOY_EVAL, output_dir=str(tmp_path / "search"), tracking_uri=tracking_uri,
        space={"sft.lr": ParamSpec(type="logfloat", low=1e-4, high=1e-1),
               "sft.epochs": ParamSpec(type="int", low=1, high=8)},
        sampler=SamplerSpec(type="tpe", seed=2, n_startup_trials=2),
        pruner=PrunerSpec(type="median", n_startup_trials=1, n_warmup_steps=0),
        objective=ObjectiveSpec(metric="val/loss", direction="minimize"), n_trials=5,
    )
    spec.validate()
    result = run_sweep(spec, pruned_above)
    trials = load_trials(spec)
    assert len(trials) == 5 and result.n_pending == 0
    assert all(1e-4 <= t.params["sft.lr"] <= 1e-1 for t in trials)
    assert result.n_complete + result.n_pruned == 5 and result.n_failed == 0
    # MedianPruner: a trial whose value at step 1 exceeds the median of the COMPLETE trials before it is pruned
    complete: list[float] = []
    for t in trials:
        value = float(t.params["sft.epochs"])
        expect_pruned = bool(complete) and value > statistics.median(complete)
        assert (t.state == TrialState.PRUNED) == expect_pruned, (t.number, value, complete)
        if not expect_pruned:
            complete.append(value)
    assert result.n_pruned >= 1
    runs = child_runs(tracking_uri, result.parent_run_id)
    assert [r.info.status for r in runs] == ["KILLED" if t.state == TrialState.PRUNED else "FINISHED"
                                             for t in trials]
    assert run_sweep(spec, pruned_above).n_complete == result.n_complete  # budget spent: nothing new runs
    assert len(load_trials(spec)) == 5



CLAIMER = """
import sys, warnings, optuna
from illada_lightning.sweeps.study import open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.simplefilter("ignore")
study = optuna.load_study(study_name="claims", storage=open_storage(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    print(study.ask()._trial_id, flush=True)
"""


@pytest.mark.slow
def test_concurrent_workers_never_claim_the_same_queued_trial(tmp_path):
    """Four processes pop 40 queued trials at once through our SQLite storage: each trial goes to exactly one
    (pysqlite's deferred transactions let two readers both claim a WAITING trial; BEGIN IMMEDIATE prevents it)."""
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=open_storage(url))
    for i in range(40):
        study.enqueue_trial({"x": i})
    waiting = {t._trial_id for t in study.get_trials(states=(TrialState.WAITING,))}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, "10"], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    claimed = [int(line) for p in procs for line in p.communicate(timeout=600)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert len(claimed) == 40 and len(set(claimed)) == 40 and set(claimed) == waiting


@pytest.mark.slow
def test_two_launchers_on_a_fresh_store_share_one_study(tmp_path):
    """Two `sweeps.run` commands started together on fresh MLflow and Optuna stores: neither crashes on schema
    creation (stores are created once, under a lock), every grid point runs once, both exit 0."""
    spec = make_spec(tmp_path, f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}", "launchers")
    from illada_lightning.config import to_yaml

    spec_file = tmp_path / "launchers.yaml"
    spec_file.write_text(to_yaml(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ILLADA_FAKE_SLEEP_S": "0.5"}
    procs = [subprocess.Popen([sys.executable, "-m", "sweeps.run", str(spec_file)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("duplicate column" in o or "Traceback" in o for o in outs), outs
    trials = load_trials(spec)
    keys = [(t.params["sft.epochs"], t.params["eval.scoring_rule"]) for t in trials]
    assert len(trials) == 4 and len(set(keys)) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    parent = MlflowClient(spec.resolved_tracking_uri).get_run(load_study_attr(spec, "mlflow_parent_run_id"))
    assert parent.info.status == "FINISHED"
    assert len(child_runs(spec.resolved_tracking_uri, parent.info.run_id)) == 4


def load_study_attr(spec: SweepSpec, key: str):
    study = optuna.load_study(study_name=spec.resolved_study_name, storage=open_storage(spec.resolved_storage))
    return study.user_attrs[key]


def declared_dead_midway(ctx):
    """Trial 0 finds itself marked FAIL meanwhile (what another worker does when it misses the heartbeats;
    Optuna would then raise "Cannot tell a FAIL trial" in this worker)."""
    if ctx.number == 0:
        storage = open_storage(ctx.spec.resolved_storage)
        storage.set_trial_state_values(ctx.trial._trial_id, TrialState.FAIL)
    return {"eval/toy/acc": 0.5}


declared_dead_midway.declared_metrics = ("eval/toy/acc",)


def test_a_trial_declared_dead_meanwhile_is_not_finished_twice(tmp_path, tracking_uri):
    spec = make_spec(tmp_path, tracking_uri, "dead_meanwhile")
    result = run_sweep(spec, declared_dead_midway)  # no "Cannot tell a FAIL trial" crash
    trials = load_trials(spec)
    assert trials[0].state == TrialState.FAIL and result.n_complete == 3 and result.n_pending == 0
    run = MlflowClient(tracking_uri).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and "result discarded" in run.data.tags["sweep.error"]
    assert run_sweep(spec, declared_dead_midway).n_complete == 4  # the relaunch reruns the point once


def stopped_by_signal(ctx):
    """What an in-process training trial raises when SLURM's SIGTERM arrives (after its checkpoint)."""
    from illada_lightning.training.interrupt import TrainingInterrupted

    raise TrainingInterrupted("training interrupted by SIGTERM at pretrain step 3", signal.SIGTERM)


stopped_by_signal.declared_metrics = ("eval/toy/acc",)


def test_a_trial_stopped_by_a_signal_stops_its_worker_instead_of_starting_the_next(tmp_path, tracking_uri):
    spec = make_spec(tmp_path, tracking_uri, "stopped")
    with pytest.raises(WorkerInterrupted) as stop:
        run_sweep(spec, stopped_by_signal)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    trials = load_trials(spec)
    assert [t.state for t in trials] == [TrialState.FAIL]  # the next grid point was never started
    assert trials[0].user_attrs["error"].startswith("interrupted: training interrupted by SIGTERM")
    run = MlflowClient(tracking_uri).get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
