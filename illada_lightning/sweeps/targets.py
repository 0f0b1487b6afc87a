"""Which config a search-space key addresses: the experiment config or the evaluation config.

- `eval_only` sweeps change only evaluation settings: every key is an evaluation key, written as the
  evaluation CLI spells it (`scoring_rule`) or with the experiment-style `eval.` prefix (`eval.scoring_rule`).
- `train` / `per_epoch` sweeps address the experiment config; a key `eval.<name>` goes to the evaluation that
  follows training (`experiments.evaluate`'s config, which also has `ckpt`, `device`, ...) and, when the
  experiment config's own `eval` group has that field, to the experiment as well (its per-epoch callback
  then evaluates with the same settings). Base `overrides` are routed the same way.
Every key is validated by loading its config with the key set (`load_config`), so a typo fails before a trial.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config
from .space import format_value, param_values
from .spec import SweepSpec

EVAL_PREFIX = "eval."
DEFAULT_EXPERIMENT_YAML = Path("experiments/configs/default.yaml")
CKPT_PLACEHOLDER = "<checkpoint trained by the sweep>"


class TargetError(ValueError):
    """A search-space key that its config does not accept."""


@dataclass
class Target:
    schema: type
    yaml_path: str | None
    overrides: list[str] = field(default_factory=list)

    def load(self, extra: list[str] = ()) -> Any:
        return load_config(self.schema, self.yaml_path, [*self.overrides, *extra])


def import_object(ref: str) -> Any:
    """`"package.module:attr"` → the object (raises TargetError saying what is missing)."""
    if ":" not in ref:
        raise TargetError(f"{ref!r} is not of the form 'package.module:name'")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"cannot import {module_name!r} (for {ref!r}): {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TargetError(f"module {module_name!r} has no attribute {attr!r}") from None


def has_field(schema: type, name: str) -> bool:
    return dataclasses.is_dataclass(schema) and any(f.name == name for f in dataclasses.fields(schema))


def experiment_yaml(spec: SweepSpec) -> str | None:
    """The sweep's experiment YAML; for the real experiment schema, experiments.run's default file."""
    if spec.experiment:
        return spec.experiment
    if spec.schema.endswith(":ExperimentConfig") and DEFAULT_EXPERIMENT_YAML.is_file():
        return str(DEFAULT_EXPERIMENT_YAML)
    return None


def experiment_eval_fields(spec: SweepSpec) -> set[str]:
    """Field names of the experiment config's `eval` group (empty when it has none)."""
    schema = import_object(spec.schema)
    if not has_field(schema, "eval"):
        return set()
    group = next(f for f in dataclasses.fields(schema) if f.name == "eval")
    group_type = group.default_factory() if callable(group.default_factory) else group.default
    return {f.name for f in dataclasses.fields(group_type)} if dataclasses.is_dataclass(group_type) else set()


def destinations(spec: SweepSpec, key: str) -> list[tuple[str, str]]:
    """Where `key` goes: [("experiment" | "eval", the key inside that config), ...]."""
    if spec.mode == "eval_only":
        return [("eval", key[len(EVAL_PREFIX):] if key.startswith(EVAL_PREFIX) else key)]
    if not key.startswith(EVAL_PREFIX):
        return [("experiment", key)]
    sub = key[len(EVAL_PREFIX):]
    out = [("eval", sub)]
    if sub.split(".", 1)[0] in experiment_eval_fields(spec):
        out.insert(0, ("experiment", key))
    return out


def route_overrides(spec: SweepSpec, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` strings → (experiment overrides, evaluation overrides)."""
    exp, ev = [], []
    for item in overrides:
        key, value = item.split("=", 1) if "=" in item else (item, "")
        for where, sub in destinations(spec, key):
            (ev if where == "eval" else exp).append(f"{sub}={value}")
    return exp, ev


def _split_base(spec: SweepSpec) -> tuple[list[str], list[str]]:
    return route_overrides(spec, list(spec.overrides))


def experiment_target(spec: SweepSpec) -> Target:
    return Target(import_object(spec.schema), experiment_yaml(spec), _split_base(spec)[0])


def eval_target(spec: SweepSpec, checkpoint: str | None = None) -> Target:
    schema = import_object(spec.evaluation.schema)
    overrides = [*_split_base(spec)[1], *spec.evaluation.overrides, *spec.evaluation.task_overrides()]
    ckpt = checkpoint or spec.checkpoint
    if has_field(schema, "ckpt") and not any(o.startswith("ckpt=") for o in overrides):
        overrides.append(f"ckpt={ckpt or CKPT_PLACEHOLDER}")
    return Target(schema, spec.evaluation.config, overrides)


def split_overrides(spec: SweepSpec, params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A trial's parameters as (experiment overrides, evaluation overrides)."""
    return route_overrides(spec, [f"{k}={format_value(v)}" for k, v in params.items()])


def uses_evaluation(spec: SweepSpec) -> bool:
    return (spec.mode != "train" or bool(spec.evaluation.config or spec.evaluation.overrides)
            or spec.objective.metric.startswith("eval/")
            or any(where == "eval" for k in spec.space for where, _ in destinations(spec, k)))


def check_space_keys(spec: SweepSpec) -> None:
    """Load each target config once plain and once per value of every key; raise TargetError on failure."""
    targets: dict[str, Target] = {}
    if spec.mode != "eval_only" or not spec.checkpoint:  # something trains: its config must load
        targets["experiment"] = experiment_target(spec)
    if uses_evaluation(spec):
        targets["eval"] = eval_target(spec)
    for key in spec.space:
        for where, _ in destinations(spec, key):
            if where not in targets:
                targets[where] = eval_target(spec) if where == "eval" else experiment_target(spec)
    for where, target in targets.items():
        try:
            target.load()
        except ConfigError as exc:
            raise TargetError(f"the sweep's base {where} config does not load: {exc}") from None
    for key, param in spec.space.items():
        for where, sub in destinations(spec, key):
            for value in param_values(param):
                try:
                    targets[where].load([f"{sub}={format_value(value)}"])
                except ConfigError as exc:
                    raise TargetError(f"search space key '{key}' (value {value!r}) is not valid for the {where} "
                                      f"config {targets[where].schema.__name__}: {exc}") from None
