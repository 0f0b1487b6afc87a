"""The one logging configuration of every command (`configure_logging`, called by each CLI's `main`).

One handler on the root logger with one format, so each message prints once: Lightning's own handler (on
the `lightning` logger, which also propagates to the root) printed every Lightning line twice. Dropped,
because they are neither ours nor actionable: Lightning's "💡 Tip" advertisements for other services, the
`LeafSpec` deprecation raised inside Lightning's pytree helper (Lightning's to fix, not the user's), and
"number of training batches is smaller than the logging interval", which is wrong here: our metrics are
logged every `log_every_n_steps` optimizer steps counted across epochs, so short SFT epochs lose nothing.
MLflow's database-migration chatter is lowered to warnings.

Importing Lightning installs its own handler (on the `lightning` logger, format `INFO: ...`), so a rule applied
before that import is undone: code that builds a Trainer calls `reapply_logging()` first, which restores the
rules in a process whose command configured them (and does nothing in a library user's process). A sweep's
spawned worker processes configure themselves as their parent did (`configured_level()`).
"""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(levelname)s %(name)s: %(message)s"
ADVERTISEMENT = "💡 Tip:"
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration")
OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_configured: list[int] = []  # the level `configure_logging` set in this process (empty: never called)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners and tools swap it; a handler holding the old
    stream would write into a closed file)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return ADVERTISEMENT not in record.getMessage()


def configure_logging(level: int = logging.INFO) -> logging.Handler:
    """Install the project's handler on the root logger (once; calling again only re-applies the rules) and
    silence the noise listed above. Returns the handler."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(DropAdvertisements())
        root.addHandler(handler)
    root.setLevel(level)
    for name in OWN_HANDLER_LOGGERS:  # their messages reach the root handler through propagation
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _configured[:] = [level]
    return handler


def configured_level() -> int | None:
    """The level this process's command configured, None when `configure_logging` was never called."""
    return _configured[0] if _configured else None


def reapply_logging() -> None:
    """Apply the rules again if this process's command configured them (Lightning, imported since, installed
    its own handler: every Lightning line would print twice, its advertisements included)."""
    if _configured:
        configure_logging(_configured[0])
