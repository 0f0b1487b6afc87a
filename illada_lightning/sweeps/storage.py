"""Optuna storage: a real database (SQLite next to the sweep by default, any SQLAlchemy RDB URL by option).

SQLite allows one writer at a time; several worker processes share the file by waiting on its lock (the
`timeout` connect argument) instead of failing with "database is locked". A heartbeat lets a relaunched sweep
tell a trial whose worker was killed (stale: no heartbeat for `2 * heartbeat_s`) from one still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.storages import RDBStorage

SQLITE_LOCK_TIMEOUT_S = 60


class StorageError(RuntimeError):
    """The Optuna storage URL cannot be opened."""


def sqlite_path(url: str) -> Path | None:
    """The file behind a `sqlite:///...` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def open_storage(
    url: str,
    heartbeat_s: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> RDBStorage:
    """Open (and create) the study database, or raise StorageError saying why it cannot be opened."""
    engine_kwargs = {}
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot open Optuna storage {url!r}: cannot create {path.parent} ({exc})") from None
        engine_kwargs["connect_args"] = {"timeout": SQLITE_LOCK_TIMEOUT_S}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat arguments are flagged experimental
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s if heartbeat_s else None,
                heartbeat_stale_trial_callback=on_stale,
            )
        except Exception as exc:  # bad dialect, unreachable server, unwritable file, ...
            raise StorageError(f"cannot open Optuna storage {url!r}: {type(exc).__name__}: {exc}") from None


@contextlib.contextmanager
def preparation_lock(url: str, lock_dir: Path) -> Iterator[None]:
    """Serialise the one-off preparation (enqueueing grid points) of launchers started at the same time.

    Workers never need it (they only pop queued trials, which the database does atomically); two *launchers*
    would otherwise both enqueue a missing grid point. The lock file sits next to a SQLite study, or in the
    sweep's output directory for a server database.
    """
    path = sqlite_path(url)
    lock_file = (path.parent / (path.name + ".lock")) if path is not None else lock_dir / "optuna.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Heartbeat:
    """Record a trial's heartbeat every `interval_s` in a daemon thread while the trial runs."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval_s: int):
        self._storage, self._trial_id, self._interval = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy database must not kill the trial
                self._storage.record_heartbeat(self._trial_id)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
