"""Checks that run before the first trial: every search key is a config key, every range is usable, the
objective is a metric some run logs, and both databases (Optuna storage, MLflow store) can be opened."""

from __future__ import annotations

import importlib
from typing import Any

from .metrics import check_objective_metric
from .spec import SweepSpec
from .storage import StorageError, open_storage
from .targets import TargetError, check_space_keys
from .tracking import TrackingError, client_for


class SweepError(ValueError):
    """A sweep that cannot start, with the reason."""


def import_object(ref: str) -> Any:
    """`"package.module:attr"` → the object."""
    if ":" not in ref:
        raise SweepError(f"{ref!r} is not of the form 'package.module:name'")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SweepError(f"cannot import {module_name!r} (for {ref!r}): {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SweepError(f"module {module_name!r} has no attribute {attr!r}") from None


def validate_sweep(spec: SweepSpec, declared_metrics=None) -> None:
    """Raise SweepError before any trial starts when the sweep cannot run as written."""
    try:
        spec.validate()
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    try:
        check_objective_metric(spec.objective.metric, declared_metrics)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    if spec.pruner.type != "none":
        try:
            check_objective_metric(spec.pruner.monitor, declared_metrics)
        except ValueError as exc:
            raise SweepError(f"pruner.monitor: {exc}") from None
    try:
        check_space_keys(spec)
    except TargetError as exc:
        raise SweepError(str(exc)) from None
    try:
        open_storage(spec.resolved_storage)
    except StorageError as exc:
        raise SweepError(str(exc)) from None
    try:
        client_for(spec.resolved_tracking_uri).search_experiments(max_results=1)
    except TrackingError as exc:
        raise SweepError(str(exc)) from None
    except Exception as exc:
        raise SweepError(f"cannot open MLflow tracking URI {spec.resolved_tracking_uri!r}: "
                         f"{type(exc).__name__}: {exc}") from None
