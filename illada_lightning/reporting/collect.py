"""Read what a report needs from MLflow (never from log files): runs, their params/metrics/tags, histories.

A report's *scope* is a set of runs: every run of one MLflow experiment (`--experiment`), or the parent run of
a sweep and all runs below it (`--sweep`: trial runs, the shared base run, the training stage runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient

from ..runs import COMMIT_TAGS, PARENT_TAG, ROLE_TAG, SWEEP_NAME_TAG, SWEEP_STUDY_TAG, TRIAL_NUMBER_TAG

REPORT_TAG = "report.role"  # runs a report created to hold its artifact: never part of a scope


class ReportError(ValueError):
    """Nothing to report on (unknown experiment or sweep), with the reason."""


@dataclass
class RunRecord:
    run_id: str
    name: str
    status: str
    experiment_id: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # last value of every metric
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get(PARENT_TAG)

    @property
    def role(self) -> str:
        return self.tags.get(ROLE_TAG, "")

    @property
    def commit(self) -> str:
        return next((self.tags[t] for t in COMMIT_TAGS if self.tags.get(t)), "unknown")

    @property
    def trial_number(self) -> int | None:
        value = self.tags.get(TRIAL_NUMBER_TAG)
        return int(value) if value is not None else None

    def sort_key(self) -> tuple:
        number = self.trial_number
        return (number is None, number if number is not None else 0, self.name, self.run_id)


def _record(run) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
        experiment_id=run.info.experiment_id, params=dict(run.data.params), metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def fetch_runs(client: MlflowClient, experiment_ids: list[str]) -> list[RunRecord]:
    """All active runs of the experiments, deterministically ordered."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token)
        runs.extend(_record(r) for r in page)
        token = page.token
        if not token:
            break
    return sorted((r for r in runs if REPORT_TAG not in r.tags), key=RunRecord.sort_key)


def experiment_ids(client: MlflowClient, name: str) -> list[str]:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"MLflow experiment {name!r} not found (experiments in this store: {', '.join(known)})")
    return [exp.experiment_id]


def descendants(runs: list[RunRecord], roots: list[str]) -> list[RunRecord]:
    """`roots` and every run below them (through `mlflow.parentRunId`)."""
    children: dict[str, list[RunRecord]] = {}
    for r in runs:
        if r.parent_id:
            children.setdefault(r.parent_id, []).append(r)
    by_id = {r.run_id: r for r in runs}
    out, stack, seen = [], list(roots), set()
    while stack:
        run_id = stack.pop()
        if run_id in seen or run_id not in by_id:
            continue
        seen.add(run_id)
        out.append(by_id[run_id])
        stack.extend(c.run_id for c in children.get(run_id, []))
    return sorted(out, key=RunRecord.sort_key)


def sweep_scope(client: MlflowClient, sweep: str) -> tuple[list[RunRecord], list[RunRecord]]:
    """(parent runs of sweep `sweep`, every run in their trees)."""
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{SWEEP_NAME_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'parent'",
        max_results=1000,
    )
    if not found:
        raise ReportError(f"no sweep named {sweep!r} in this MLflow store (no run tagged sweep.name={sweep!r})")
    exp_ids = sorted({r.info.experiment_id for r in found})
    runs = fetch_runs(client, exp_ids)
    parents = sorted((_record(r) for r in found), key=lambda r: (r.tags.get(SWEEP_STUDY_TAG, ""), r.run_id))
    return parents, descendants(runs, [p.run_id for p in parents])


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] sorted by step (the last value wins when a step was logged twice)."""
    points: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        points[int(m.step)] = float(m.value)
    return sorted(points.items())
