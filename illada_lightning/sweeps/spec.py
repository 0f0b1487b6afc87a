"""The sweep specification: what a YAML file under `sweeps/` may say, as typed dataclasses.

    spec = load_sweep_spec("sweeps/scoring_rule.yaml", ["n_workers=2"])

A sweep names a base experiment config (+ overrides), a search space over config keys, a sampler, a pruner,
an objective metric and a *mode* that decides how much work one trial does:

- ``train``: every trial is a full `experiments.run` experiment with the trial's overrides;
- ``eval_only``: one checkpoint is trained (or given) once; every trial only evaluates it with different
  evaluation settings (scoring rule, block length, steps, remasking), so the space addresses `EvalConfig` keys;
- ``per_epoch``: the SFT-epoch ablation (iLLaDA Fig. 1): train once for the largest epoch count with the
  per-epoch evaluation callback, then every trial reads (or evaluates) one epoch instead of training N times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_config
from ..runs import DEFAULT_RUNS_ROOT, OPTUNA_FILE, SWEEPS_DIR, default_tracking_uri

PARAM_TYPES = ("categorical", "int", "float", "logfloat")
SAMPLERS = ("grid", "tpe", "random", "qmc")
PRUNERS = ("none", "median")
MODES = ("train", "eval_only", "per_epoch")
TRIAL_LAUNCHERS = ("auto", "torchrun", "srun")
DIRECTIONS = ("maximize", "minimize")

DEFAULT_EXPERIMENT_SCHEMA = "illada_lightning.experiment.config:ExperimentConfig"
DEFAULT_EVAL_SCHEMA = "illada_lightning.evaluation.cli:EvaluateConfig"


@dataclass
class ParamSpec:
    """One search dimension. `type: logfloat` is `type: float` with `log: true` (log-uniform)."""

    type: str = "categorical"
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_log(self) -> bool:
        return self.log or self.type == "logfloat"

    def check(self, key: str) -> None:
        """Raise a ConfigError naming `key` when the range or the choices are unusable."""
        where = f"search space key '{key}'"
        if self.type not in PARAM_TYPES:
            raise ConfigError(f"{where}: type {self.type!r} is not one of {', '.join(PARAM_TYPES)}")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{where}: categorical parameter needs a non-empty `choices` list")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ConfigError(f"{where}: `choices` {list(self.choices)} has duplicates")
            return
        if self.choices:
            raise ConfigError(f"{where}: `choices` is only for type categorical (got type {self.type})")
        if self.low is None or self.high is None:
            raise ConfigError(f"{where}: type {self.type} needs both `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ConfigError(f"{where}: invalid range low={self.low} >= high={self.high} (need low < high)")
        if self.is_log and self.low <= 0:
            raise ConfigError(f"{where}: a log-scale range needs low > 0 (got low={self.low})")
        if self.step is not None:
            if self.step <= 0:
                raise ConfigError(f"{where}: step must be > 0 (got {self.step})")
            if self.is_log:
                raise ConfigError(f"{where}: `step` cannot be combined with a log scale")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high)):
            raise ConfigError(f"{where}: type int needs integer low/high (got {self.low}, {self.high})")


@dataclass
class SamplerSpec:
    type: str = "grid"
    seed: int = 0
    n_startup_trials: int = 5  # TPE: random trials before the model-based proposals start


@dataclass
class PrunerSpec:
    type: str = "none"
    n_startup_trials: int = 2  # median: never prune before this many trials have finished
    n_warmup_steps: int = 1  # median: never prune a trial before it reported this many steps
    monitor: str = "val/loss"  # the metric reported to Optuna after every validation


@dataclass
class ObjectiveSpec:
    metric: str = "val/loss"
    direction: str | None = None  # None: maximize eval/* accuracies, minimize losses

    def resolve_direction(self) -> str:
        if self.direction is None:
            higher_is_better = self.metric.startswith("eval/") and not self.metric.endswith("stderr")
            self.direction = "maximize" if higher_is_better else "minimize"
        return self.direction


@dataclass
class EvaluationSpec:
    """The evaluation config used by `eval_only` / `per_epoch` trials (`experiments.evaluate`'s EvalConfig).

    `tasks` and `data` are its `tasks` and `data.<task>` keys, spelled out so that a command line enables a
    paper task by pointing at its file: `evaluation.tasks=[cloze,piqa] evaluation.data.piqa=PATH`."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    schema: str = DEFAULT_EVAL_SCHEMA
    tasks: list[str] | None = None  # None: the evaluation config's own
    data: dict[str, str] = field(default_factory=dict)  # task -> data file

    def task_overrides(self) -> list[str]:
        tasks = [f"tasks=[{','.join(self.tasks)}]"] if self.tasks is not None else []
        return [*tasks, *(f"data.{task}={path}" for task, path in sorted(self.data.items()))]


@dataclass
class SweepSpec:
    name: str = "sweep"
    experiment: str | None = None  # base experiment config YAML (experiments/configs/...)
    overrides: list[str] = field(default_factory=list)  # base overrides applied to every trial
    schema: str = DEFAULT_EXPERIMENT_SCHEMA  # "module:Class" of the experiment config
    mode: str = "train"
    space: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    checkpoint: str | None = None  # eval_only: reuse this checkpoint instead of training one
    n_trials: int | None = None  # grid: defaults to (and is capped by) the grid size
    n_workers: int = 1  # parallel worker processes sharing the study
    output_dir: str | None = None  # default runs/sweeps/<name>
    storage: str | None = None  # Optuna RDB URL; default sqlite:///<output_dir>/optuna.db
    study_name: str | None = None  # default: name
    tracking_uri: str | None = None  # MLflow; default sqlite:///<runs root>/mlflow.db
    mlflow_experiment: str | None = None  # default: name
    trial_fn: str | None = None  # "module:function" replacing the built-in trial of `mode` (tests, custom work)
    heartbeat_s: int = 10  # Optuna's heartbeat; a RUNNING trial silent for 3x this long is dead (FAIL, retried)
    max_retry: int | None = 3  # reruns of a dead worker's trial (Optuna's RetryHeartbeatStaleTrialCallback)
    # A trial asking for several devices or nodes runs as its own process group (process_group.py), launched
    # by torchrun on one node or srun across nodes (auto: srun when num_nodes > 1).
    trial_launcher: str = "auto"

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"sweep name {self.name!r} must be non-empty and contain no '/'")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.sampler.type not in SAMPLERS:
            raise ValueError(f"sampler.type {self.sampler.type!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner.type not in PRUNERS:
            raise ValueError(f"pruner.type {self.pruner.type!r} is not one of {', '.join(PRUNERS)}")
        if self.objective.resolve_direction() not in DIRECTIONS:
            raise ValueError(f"objective.direction {self.objective.direction!r} is not one of {DIRECTIONS}")
        if not self.space:
            raise ValueError("the search space is empty: give at least one key under `space`")
        for key, param in self.space.items():
            param.check(key)
        if self.sampler.type == "grid":
            for key, param in self.space.items():
                if param.type in ("float", "logfloat") and param.step is None:
                    raise ValueError(
                        f"search space key '{key}': a grid sampler needs finite values; give `choices` "
                        "(type categorical) or a `step` for this float range"
                    )
        if self.n_trials is not None and self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1 (got {self.n_trials})")
        if self.trial_launcher not in TRIAL_LAUNCHERS:
            raise ValueError(f"trial_launcher {self.trial_launcher!r} is not one of {', '.join(TRIAL_LAUNCHERS)}")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be >= 1 (got {self.n_workers})")
        if self.heartbeat_s < 1:
            raise ValueError(f"heartbeat_s must be >= 1 (got {self.heartbeat_s})")
        if self.max_retry is not None and self.max_retry < 0:
            raise ValueError(f"max_retry must be >= 0 or null (got {self.max_retry})")
        if self.mode == "per_epoch":
            if len(self.space) != 1:
                raise ValueError("mode per_epoch sweeps exactly one key: the number of SFT epochs")
            (param,) = self.space.values()
            if param.type == "categorical" and not all(isinstance(c, int) and c >= 1 for c in param.choices):
                raise ValueError(f"mode per_epoch needs positive integer epoch choices (got {param.choices})")

    # Derived locations -------------------------------------------------------------------------------
    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(DEFAULT_RUNS_ROOT) / SWEEPS_DIR / self.name

    @property
    def resolved_storage(self) -> str:
        return self.storage or f"sqlite:///{(self.resolved_output_dir / OPTUNA_FILE).resolve()}"

    @property
    def resolved_study_name(self) -> str:
        return self.study_name or self.name

    @property
    def resolved_mlflow_experiment(self) -> str:
        return self.mlflow_experiment or self.name

    @property
    def resolved_tracking_uri(self) -> str:
        # The training runs' default store (`sqlite:///<runs root>/mlflow.db`), so sweeps and plain runs meet.
        return self.tracking_uri or default_tracking_uri(DEFAULT_RUNS_ROOT)


def load_sweep_spec(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read a sweep YAML (+ `key=value` overrides) into a validated `SweepSpec`."""
    try:
        return load_config(SweepSpec, path, list(overrides))
    except yaml.YAMLError as exc:  # an override whose value is not valid YAML (e.g. an unquoted nested list)
        first = str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse the overrides {list(overrides)}: {first}; quote list items that "
                          'contain brackets, e.g. \'evaluation.overrides=["tasks=[cloze]",limit=100]\'') from None
