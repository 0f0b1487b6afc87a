"""Real services for the cluster tests: PostgreSQL and MLflow tracking servers.

`.ci/services.sh` starts Debian's PostgreSQL and an MLflow server on it and exports ILLADA_TEST_PG_URL,
ILLADA_TEST_PG_MLFLOW, ILLADA_TEST_MLFLOW_URI (and ILLADA_TEST_PG_CLUSTER for the restart drill). Without
them these tests skip with one line saying what to start; with ILLADA_REQUIRE_SERVICES=1 (set by .ci/run)
a missing service fails the test instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy

HINT = "start PostgreSQL and an MLflow server first: `. .ci/services.sh` (it exports ILLADA_TEST_PG_URL, ...)"


def need(var: str) -> str:
    value = os.environ.get(var)
    if value:
        return value
    message = f"needs {var}: {HINT}"
    if os.environ.get("ILLADA_REQUIRE_SERVICES"):
        pytest.fail(f"ILLADA_REQUIRE_SERVICES is set but {message}")
    pytest.skip(message)


def with_database(url: str, name: str) -> str:
    return sqlalchemy.make_url(url).set(database=name).render_as_string(hide_password=False)


def fresh_database(base_url: str):
    """Create a database of its own for one test; yields its URL, drops it afterwards."""
    name = f"illada_t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield with_database(base_url, name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(uri: str, proc: subprocess.Popen | None = None, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"MLflow server {uri} not healthy after {timeout_s} s")


def start_mlflow_server(backend_uri: str, port: int, artifacts: Path, log: Path) -> subprocess.Popen:
    """`mlflow server` on `backend_uri` with proxied artifacts, as a user starts one (waits until healthy). It
    runs in a session of its own: its web workers are child processes, which `stop_server` stops with it."""
    out = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runners
    wait_healthy(f"http://127.0.0.1:{port}", proc)
    return proc


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the server's whole process group (SIGKILL: a crash), and wait until it is gone."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait()


def server_unreachable(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=2)
    except OSError:
        return True
    return False
