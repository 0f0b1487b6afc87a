"""Search space → Optuna suggestions, grid points and `key=value` overrides."""

from __future__ import annotations

import json
from typing import Any

import optuna

from .spec import ParamSpec


def param_values(param: ParamSpec) -> list[Any]:
    """The finite values of one dimension (for grids and key validation); ranges without a step give ends."""
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        step = int(param.step or 1)
        return list(range(int(param.low), int(param.high) + 1, step))
    if param.step is None:
        return [float(param.low), float(param.high)]
    n = int(round((param.high - param.low) / param.step))
    return [round(param.low + i * param.step, 12) for i in range(n + 1) if param.low + i * param.step <= param.high + 1e-12]


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ask the trial for every dimension (enqueued grid trials get their fixed values back)."""
    params: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.is_log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.is_log)
    return params


def format_value(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override that OmegaConf parses back to `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def to_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in params.items()]


def params_key(params: dict[str, Any]) -> str:
    """A canonical string for a parameter set (grid bookkeeping: which points are done)."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
