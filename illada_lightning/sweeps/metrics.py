"""Which objective metrics a sweep may optimise: known training metrics and `eval/<task>/<metric>`.

An objective that no run logs would make every trial "complete" with a missing value; we refuse it before the
first trial instead. Evaluation metrics are checked against the task registry of `illada_lightning.evaluation`
(when it is importable); a trial function may also declare the metrics it logs (`trial_fn.declared_metrics`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

# Logged by the training LightningModules (issue "Training"): the names the objective may use.
TRAINING_METRICS = frozenset(
    {
        "train/loss",
        "train/masked_fraction",
        "train/grad_norm",
        "train/lr",
        "train/tokens_per_s",
        "train/steps_per_s",
        "val/loss",
    }
)
# Metric names an evaluation task may report (accuracy-like and exact-match-like, with their errors).
EVAL_METRIC_NAMES = frozenset(
    {"acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "acc_stderr", "acc_norm_stderr",
     "exact_match_stderr", "n", "seconds"}
)


def registered_tasks() -> list[str] | None:
    """Names of the registered evaluation tasks, or None when the evaluation package offers no registry."""
    try:
        module = importlib.import_module("illada_lightning.evaluation")
    except Exception:  # the evaluation package may be absent or broken: fall back to a form check
        return None
    for attr in ("list_tasks", "registered_tasks", "available_tasks", "task_names"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return sorted(fn())
    for attr in ("TASKS", "TASK_REGISTRY", "REGISTRY"):
        reg = getattr(module, attr, None)
        if isinstance(reg, dict):
            return sorted(reg)
    return None


def check_objective_metric(metric: str, declared: Iterable[str] | None = None) -> None:
    """Raise ValueError unless `metric` is one a run of this sweep will log."""
    if declared is not None:
        declared = set(declared)
        if metric in declared:
            return
        raise ValueError(f"objective metric {metric!r} is not logged by this trial function; it logs: {sorted(declared)}")
    if metric in TRAINING_METRICS:
        return
    parts = metric.split("/")
    if len(parts) == 3 and parts[0] == "eval" and all(parts):
        _, task, name = parts
        tasks = registered_tasks()
        if tasks is not None and task not in tasks:
            raise ValueError(
                f"objective metric {metric!r}: task {task!r} is not a registered evaluation task "
                f"(registered: {', '.join(tasks)})"
            )
        if name not in EVAL_METRIC_NAMES:
            raise ValueError(
                f"objective metric {metric!r}: {name!r} is not an evaluation metric name "
                f"(known: {', '.join(sorted(EVAL_METRIC_NAMES))})"
            )
        return
    raise ValueError(
        f"objective metric {metric!r} is logged by no run: use eval/<task>/<metric> or one of "
        f"{', '.join(sorted(TRAINING_METRICS))}"
    )
