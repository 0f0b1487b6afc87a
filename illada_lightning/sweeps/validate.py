"""Checks that run before the first trial: every search key is a config key, every range is usable, the
objective is a metric some run logs, every evaluation task's data file exists, and both databases (Optuna
storage, MLflow store) can be opened."""

from __future__ import annotations

from collections.abc import Iterable

from ..config import ConfigError
from ..evaluation.records import EvalDataError
from ..evaluation.tasks import get_task, registered_tasks
from ..redact import mask_password
from ..runs import EVAL_METRIC_NAMES, TRAINING_METRICS, server_unreachable
from .space import format_value, param_values
from .spec import SweepSpec
from .study import StorageError, open_storage
from .targets import TargetError, check_space_keys, destinations, eval_target, uses_evaluation
from .tracking import TrackingError, client_for

# Where to get the files of the paper's benchmarks (`../shared/data` holds only some; see its README).
DATA_SOURCES = {
    "hellaswag": "github.com/rowanz/hellaswag (data/hellaswag_val.jsonl)",
    "arc_challenge": "allenai.org/data/arc (ARC-V1-Feb2018: ARC-Challenge-Test.jsonl)",
    "arc_easy": "allenai.org/data/arc (ARC-V1-Feb2018: ARC-Easy-Test.jsonl)",
    "piqa": "yonatanbisk.com/piqa (valid.jsonl and valid-labels.lst)",
    "mmlu": "github.com/hendrycks/test (data.tar: test/*.csv)",
    "gsm8k": "github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
}


class SweepError(ValueError):
    """A sweep that cannot start, with the reason."""


def check_objective_metric(metric: str, declared: Iterable[str] | None = None) -> None:
    """Raise ValueError unless `metric` is one a run of this sweep will log (`runs.TRAINING_METRICS`,
    `eval/<registered task>/<metric name>`, or what the trial function declares)."""
    if declared is not None:
        if metric in set(declared):
            return
        raise ValueError(f"objective metric {metric!r} is not logged by this trial function; it logs: {sorted(declared)}")
    if metric in TRAINING_METRICS:
        return
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "eval" or not all(parts):
        raise ValueError(f"objective metric {metric!r} is logged by no run: use eval/<task>/<metric> or one of "
                         f"{', '.join(sorted(TRAINING_METRICS))}")
    _, task, name = parts
    if task not in registered_tasks():
        raise ValueError(f"objective metric {metric!r}: task {task!r} is not a registered evaluation task "
                         f"(registered: {', '.join(registered_tasks())})")
    if name not in EVAL_METRIC_NAMES:
        raise ValueError(f"objective metric {metric!r}: {name!r} is not an evaluation metric name "
                         f"(known: {', '.join(sorted(EVAL_METRIC_NAMES))})")


def missing_task_data(spec: SweepSpec) -> list[str]:
    """One line per evaluation task whose data file is missing (for every `tasks` a trial may use)."""
    if not uses_evaluation(spec):
        return []
    target = eval_target(spec)
    variants = [[]]
    for key, param in spec.space.items():
        for where, sub in destinations(spec, key):
            if where == "eval" and sub.split(".", 1)[0] in ("tasks", "data"):
                variants += [[f"{sub}={format_value(v)}"] for v in param_values(param)]
    missing: dict[str, str] = {}
    for extra in variants:
        try:
            cfg = target.load(extra)
        except ConfigError:
            continue  # check_space_keys reports bad configs
        for task in getattr(cfg, "tasks", []):
            try:
                get_task(task).data_path(cfg)
            except EvalDataError as exc:
                source = f"\n  get it from: {DATA_SOURCES[task]}" if task in DATA_SOURCES else ""
                missing.setdefault(task, f"{exc}{source}")
    return [missing[t] for t in sorted(missing)]


def validate_sweep(spec: SweepSpec, declared_metrics=None) -> None:
    """Raise SweepError before any trial starts when the sweep cannot run as written."""
    try:
        spec.validate()
        check_objective_metric(spec.objective.metric, declared_metrics)
        if spec.pruner.type != "none":
            try:
                check_objective_metric(spec.pruner.monitor, declared_metrics)
            except ValueError as exc:
                raise ValueError(f"pruner.monitor: {exc}") from None
        check_space_keys(spec)
        missing = missing_task_data(spec)
        if missing:
            raise ValueError(f"{len(missing)} evaluation task(s) have no data file; point `evaluation.data.<task>=PATH` "
                             "at your copy or drop the task from `evaluation.tasks`:\n" + "\n".join(missing))
        open_storage(spec.resolved_storage)
        down = server_unreachable(spec.resolved_tracking_uri)  # at once, not after MLflow's minutes of retries
        if down:
            raise TrackingError(f"cannot reach the MLflow tracking server {spec.resolved_tracking_uri} ({down})")
        client_for(spec.resolved_tracking_uri).search_experiments(max_results=1)
    except (ValueError, TargetError, StorageError, TrackingError) as exc:
        raise SweepError(mask_password(str(exc))) from None
    except Exception as exc:
        raise SweepError(mask_password(f"cannot open MLflow tracking URI {spec.resolved_tracking_uri!r}: "
                                       f"{type(exc).__name__}: {exc}")) from None
