"""One study, many machines, real services: PostgreSQL (Optuna storage, MLflow's backend) and an MLflow tracking
server (tests/services.py says how they are started). Launchers started from different directories stand in
for hosts: they share nothing but the two servers. Fault drills: a launcher killed mid-trial, PostgreSQL
restarted mid-sweep, the tracking server down in the middle of a training run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow import MlflowClient
from optuna.trial import TrialState

from illada_lightning.config import to_yaml
from illada_lightning.sweeps import ParamSpec, SweepSpec
from illada_lightning.sweeps.spec import EvaluationSpec, ObjectiveSpec
from illada_lightning.sweeps.study import open_storage
from tests import services

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PASSWORD = os.environ.get("ILLADA_PG_PASSWORD", "illada-ci")


@pytest.fixture
def pg_url():
    yield from services.fresh_database(services.need("ILLADA_TEST_PG_URL"))


@pytest.fixture
def tracking_uri():
    return services.need("ILLADA_TEST_MLFLOW_URI")


def grid_spec(tmp_path: Path, name: str, storage: str, tracking_uri: str, epochs=(1, 2, 3), **kw) -> Path:
    """A 6-point grid of the fake trial (tests/sweep_fakes.py), written as a sweep file."""
    spec = SweepSpec(
        name=name, schema="tests.sweep_fakes:ToyExperimentConfig",
        evaluation=EvaluationSpec(schema="tests.sweep_fakes:ToyEvalConfig"),
        space={"sft.epochs": ParamSpec(choices=list(epochs)),
               "eval.scoring_rule": ParamSpec(choices=["confidence", "likelihood"])},
        objective=ObjectiveSpec("eval/toy/acc", "maximize"), storage=storage, tracking_uri=tracking_uri,
        study_name=f"{name}-{tmp_path.name}"[-60:], mlflow_experiment=f"{name}-{tmp_path.name}"[-60:],
        output_dir="sweep_out",  # relative: each launcher (host) keeps its own
        trial_fn="tests.sweep_fakes:fake_trial", **kw)
    spec.validate()
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(spec))
    return path


def launch(spec_file: Path, cwd: Path, *overrides: str, env=None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "sweeps.run", str(spec_file), *overrides], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_trials(storage: str, study_name: str) -> list:
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage)).get_trials()
    except KeyError:  # not created yet
        return []


def postmaster_start(url: str):
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_postmaster_start_time()").scalar()


def wait_for(predicate, what: str, timeout_s: float = 300, procs=()):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        if procs and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}: " + " | ".join((p.communicate()[0] or "")[-1500:] for p in procs
                                                               if p.poll() is not None))


def test_three_launchers_share_one_postgres_study_one_killed_midway(tmp_path, pg_url, tracking_uri):
    """Launchers in three directories, on a fresh database (the schema and study are created once), with the
    password given three ways (in the URL, PGPASSWORD, a .pgpass file). One is killed (-9) in the middle of a
    trial: its trial FAILs on the heartbeat and another launcher reruns its grid point. Every point runs to
    COMPLETE exactly once; the budget (6) is never exceeded; no password is stored or printed."""
    no_password = pg_url.replace(f":{PASSWORD}@", "@")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:5432:*:illada:{PASSWORD}\n")
    pgpass.chmod(0o600)
    spec_file = grid_spec(tmp_path, "hosts", pg_url, tracking_uri, heartbeat_s=1)
    slow = {"ILLADA_FAKE_SLEEP_S": "3"}
    procs = [launch(spec_file, tmp_path / "host0", env=slow),
             launch(spec_file, tmp_path / "host1", f"storage={no_password}", env={**slow, "PGPASSWORD": PASSWORD}),
             launch(spec_file, tmp_path / "host2", f"storage={no_password}", env={**slow, "PGPASSFILE": str(pgpass)})]
    name = f"hosts-{tmp_path.name}"[-60:]
    victim = procs[0]

    def victim_in_trial():
        return any(t.state == TrialState.RUNNING and f":{victim.pid}:" in t.user_attrs.get("worker", "")
                   for t in study_trials(pg_url, name))

    try:
        wait_for(victim_in_trial, "launcher 0 to run a trial", procs=procs)
        victim.send_signal(signal.SIGKILL)
        outs = [p.communicate(timeout=600)[0] for p in procs[1:]]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs[1:]] == [0, 0], outs
    trials = study_trials(pg_url, name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    points = [(t.params["sft.epochs"], t.params["eval.scoring_rule"]) for t in complete]
    print(f"\n3 launchers, launcher 0 (pid {victim.pid}) killed: {len(trials)} trials, {len(complete)} COMPLETE, "
          f"{len(failed)} FAIL ({failed[0].user_attrs.get('error', 'no heartbeat') if failed else '-'}), "
          f"retries {sum('failed_trial' in t.system_attrs for t in trials)}, "
          f"duplicate points {len(points) - len(set(points))}")
    assert len(complete) == 6 and len(set(points)) == 6  # every grid point once
    assert len(failed) == 1 and f":{victim.pid}:" in failed[0].user_attrs["worker"]
    assert failed[0].params in [t.params for t in complete]  # the killed trial's point was retried
    assert sum("failed_trial" not in t.system_attrs for t in trials) == 6  # fresh trials: the budget, no more
    client = MlflowClient(tracking_uri)
    runs = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in trials}
    assert runs[failed[0].number].info.status == "KILLED"
    assert all(runs[t.number].info.status == "FINISHED" for t in complete)
    parent = client.get_run(runs[complete[0].number].data.tags["mlflow.parentRunId"])
    stored = " ".join([*parent.data.params.values(), *parent.data.tags.values()])
    assert "postgresql+psycopg://illada:***@" in stored or "postgresql+psycopg://illada@" in stored
    assert PASSWORD not in stored and not any(PASSWORD in out for out in outs)


def test_postgres_restart_mid_sweep_the_workers_reconnect_and_finish(tmp_path, pg_url, tracking_uri):
    cluster = services.need("ILLADA_TEST_PG_CLUSTER").split()
    spec_file = grid_spec(tmp_path, "restart", pg_url, tracking_uri, epochs=(1, 2), heartbeat_s=3)
    procs = [launch(spec_file, tmp_path / f"host{i}", env={"ILLADA_FAKE_SLEEP_S": "4"}) for i in range(2)]
    name = f"restart-{tmp_path.name}"[-60:]
    try:
        wait_for(lambda: [t.state for t in study_trials(pg_url, name)].count(TrialState.RUNNING) == 2,
                 "both launchers to run a trial", procs=procs)
        started_before = postmaster_start(pg_url)
        restart = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
                                 capture_output=True, text=True)
        started_after = postmaster_start(pg_url)
        assert restart.returncode == 0, restart.stderr
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    print("\nPostgreSQL restart:", restart.stdout.strip(), *[line for out in outs for line in out.splitlines()
                                                         if "unreachable" in line or "complete," in line], sep="\n")
    # The server really restarted while both trials ran: every pooled connection died with it (a call that
    # met the dead server logged "unreachable" and retried; pool_pre_ping replaced the others silently).
    assert started_after > started_before
    states = [t.state for t in study_trials(pg_url, name)]
    assert states == [TrialState.COMPLETE] * 4, [(t.state, t.user_attrs.get("error")) for t in study_trials(pg_url, name)]


def test_tracking_server_down_mid_training_loses_and_duplicates_no_metric(tmp_path, pg_url):
    """A real (tiny) training run logs to its own MLflow server, which is killed after a few steps and started
    again on the same port and database ~15 s later: the run finishes, and holds every step's metrics once."""
    backend = pg_url
    port = services.free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow.log"
    server = services.start_mlflow_server(backend, port, tmp_path / "artifacts", log)
    steps = 40
    train = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "stage=pretrain", f"pretrain.max_steps={steps}",
         "pretrain.log_every_n_steps=1", "pretrain.val_every_n_steps=0", "pretrain.ckpt_every_n_steps=1000",
         "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
         "model.vocab_size=512", "tokenizer.vocab_size=512", "pretrain.data.max_seq_len=64", "pretrain.batch_size=4",
         "progress_bar=false", f"mlflow.tracking_uri={uri}", f"runs_root={tmp_path / 'runs'}", "name=outage"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    client = MlflowClient(uri)
    try:
        def logged_steps() -> int:
            exp = client.get_experiment_by_name("illada-lightning")
            runs = client.search_runs([exp.experiment_id], "tags.`illada.stage` = 'pretrain'") if exp else []
            return len(client.get_metric_history(runs[0].info.run_id, "train/loss")) if runs else 0

        wait_for(lambda: logged_steps() >= 3, "the first logged steps", procs=[train])
        services.stop_server(server, signal.SIGKILL)  # the server dies; training goes on without it
        down_at = time.time()
        assert services.server_unreachable(uri)
        time.sleep(float(os.environ.get("ILLADA_OUTAGE_S", "8")))  # the drill in the closing note: 30
        server = services.start_mlflow_server(backend, port, tmp_path / "artifacts", log)
        outage_s = time.time() - down_at
        out = train.communicate(timeout=900)[0]
        assert train.returncode == 0, out[-3000:]
        exp = client.get_experiment_by_name("illada-lightning")
        (run,) = client.search_runs([exp.experiment_id], "tags.`illada.stage` = 'pretrain'")
        history = client.get_metric_history(run.info.run_id, "train/loss")
    finally:
        train.kill()
        services.stop_server(server)
    print(f"\ntracking server down for {outage_s:.0f} s mid-training:", *[line for line in out.splitlines()
                                                      if "MLflow" in line or "[pretrain]" in line], sep="\n")
    assert sorted(m.step for m in history) == list(range(steps))  # every step once: none lost, none twice
    assert run.info.status == "FINISHED" and "illada.metrics_missing_steps" not in run.data.tags
    # Training waited for the server rather than losing what it logged meanwhile (MLflow's client retries).
    summary = json.loads((tmp_path / "runs" / "outage" / "pretrain" / "FINISHED").read_text())
    assert summary["wall_time_s"] > outage_s - 5
