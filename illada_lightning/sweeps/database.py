"""The study database shared by launchers on many hosts: one lock for all of them, and calls that outlive a
database restart.

- `study_lock(url, study, fallback_dir)`: held while a launcher checks "is there budget left?" and claims a trial
  (Optuna's ask), and while it prepares the study. On PostgreSQL it is a session-level advisory lock
  (`pg_advisory_lock`) keyed by the study name, on a connection of its own: every launcher on every host waits
  for the same lock, and the server drops it when the holder's connection dies (kill -9, a lost host), so a dead
  launcher never blocks the others. On SQLite (one host's file) it is a file lock beside the database. Other
  servers get the file lock with a warning: safe only for launchers on one host.
- `creation_lock(url)`: the same, around creating the schema of a fresh database (two launchers creating
  Optuna's tables at once collide on alembic's version row).
- `ReconnectingRDBStorage`: Optuna's `RDBStorage` with `pool_pre_ping` (a connection the server dropped is
  replaced at checkout) and every storage call retried with backoff while the server is unreachable (a
  restart), for up to `RECONNECT_S`; the heartbeat thread included, which would otherwise die on the first
  failed beat and let the other workers declare a live trial dead.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage

from ..redact import mask_password
from ..runs import sqlite_path
from .tracking import file_lock

log = logging.getLogger(__name__)
RECONNECT_S = 300.0  # how long a storage call keeps retrying while the database is unreachable
_MAX_DELAY_S = 10.0


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql", "postgres:"))


def is_disconnect(exc: BaseException) -> bool:
    """The database went away (refused, reset, shut down), as opposed to a bad query or bad data."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
        isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated)


def retry_while_unreachable(call, what: str, url: str, deadline_s: float = RECONNECT_S):
    """`call()`, retried with exponential backoff while the database is unreachable, up to `deadline_s`."""
    deadline, delay = time.monotonic() + deadline_s, 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_disconnect(exc) or time.monotonic() + delay > deadline:
                raise
            first = str(exc.__cause__ or exc).strip().splitlines()[0][:200]
            log.warning("%s: database %s unreachable (%s); retrying in %.1f s", what, mask_password(url),
                        mask_password(first), delay)
            time.sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)


class ReconnectingRDBStorage(RDBStorage):
    """Optuna's RDBStorage whose calls survive a restart of the database server (see the module doc)."""


def _retrying(name: str):
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return retry_while_unreachable(lambda: method(self, *args, **kwargs), f"optuna {name}", self.url)

    return call


# Every call a sweep makes through a study (asking, telling, attrs, heartbeats, the stale-trial scan), the
# private ones Optuna's `_CachedStorage` calls on its backend included.
for _name in ("_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
              "create_new_study", "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
              "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr",
              "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_state_values",
              "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "get_best_trial",
              "get_trial_user_attrs", "get_trial_system_attrs", "record_heartbeat", "_get_stale_trial_ids"):
    setattr(ReconnectingRDBStorage, _name, _retrying(_name))


def server_engine_kwargs(url: str) -> dict:
    """Engine options for a database server: test each pooled connection before use (a restart drops them all)."""
    return {} if sqlite_path(url) is not None or url.startswith("sqlite") else {"pool_pre_ping": True}


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for pg_advisory_lock, the same on every host."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@functools.cache
def _lock_engine(url: str) -> sqlalchemy.Engine:
    # NullPool: closing the connection ends the session, which releases the lock even if unlock was never sent.
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)


class _AdvisoryLock:
    """A PostgreSQL session-level advisory lock; `release()` may come early, inside the `with` block."""

    def __init__(self, url: str, name: str):
        self.url, self.key, self._conn = url, _advisory_key(name), None

    def __enter__(self) -> _AdvisoryLock:
        def acquire():
            conn = _lock_engine(self.url).connect()
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
                conn.commit()
            except BaseException:
                conn.close()
                raise
            return conn

        self._conn = retry_while_unreachable(acquire, "sweep lock", self.url)
        return self

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with contextlib.suppress(Exception):  # a dead connection has already released the lock
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            conn.commit()
        with contextlib.suppress(Exception):
            conn.close()

    def __exit__(self, *exc) -> None:
        self.release()


@functools.cache
def _warn_single_host(url: str) -> None:
    log.warning("storage %s: no cross-host lock for this database; the sweep's budget check and trial claim are "
                "locked per host only (use PostgreSQL for launchers on several hosts)", mask_password(url))


def study_lock(url: str, study_name: str, fallback_dir: Path):
    """The lock every launcher of `study_name` takes to check the budget and claim a trial (module doc)."""
    path = sqlite_path(url)
    if path is not None:
        return file_lock(path.with_name(path.name + ".lock"))
    if is_postgresql(url):
        return _AdvisoryLock(url, f"illada-sweep:{study_name}")
    _warn_single_host(url)
    return file_lock(fallback_dir / "optuna.lock")


def creation_lock(url: str):
    """Held while a storage is opened (and its schema possibly created) from several launchers at once."""
    path = sqlite_path(url)
    if path is not None:
        return file_lock(path.with_name(path.name + ".create.lock"))
    if is_postgresql(url):
        return _AdvisoryLock(url, "illada-sweep-schema")
    return contextlib.nullcontext()
