"""Build a Markdown report (tables + PNG plots) from an MLflow store, and log it to the parent run.

    path = build_report("sqlite:///runs/mlflow.db", sweep="scoring_rule")   # -> reports/scoring_rule/report.md

The body holds no timestamps and every collection is sorted, so the same store gives byte-identical Markdown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from ..runs import EXPERIMENT_TAGS, STAGE_TAG, SWEEP_ERROR_TAG, SWEEP_PARAM_PREFIX
from .collect import (
    REPORT_TAG,
    ReportError,
    RunRecord,
    descendants,
    experiment_ids,
    fetch_runs,
    metric_history,
)
from .collect import sweep_scope as _sweep_scope
from .plots import plot_epoch_curve
from .tables import (
    EVAL_KEY,
    NOTE,
    Estimate,
    Table,
    ablation_table,
    clearly_ahead,
    estimate,
    is_seed_key,
    markdown_table,
    n_key,
    parse_value,
    primary_metrics,
    setting_estimates,
    stderr_key,
)
from .training_curves import training_section

REPORT_FILE = "report.md"


@dataclass
class Report:
    name: str
    out_dir: Path
    markdown: str
    plots: list[Path] = field(default_factory=list)
    cited: list[RunRecord] = field(default_factory=list)
    logged_to: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.out_dir / REPORT_FILE


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "report"


def swept_keys(parent: RunRecord, trials: list[RunRecord]) -> list[str]:
    if "sweep.space" in parent.tags:
        return list(json.loads(parent.tags["sweep.space"]))
    keys = []
    for t in trials:
        for tag in t.tags:
            if tag.startswith(SWEEP_PARAM_PREFIX) and tag[len(SWEEP_PARAM_PREFIX):] not in keys:
                keys.append(tag[len(SWEEP_PARAM_PREFIX):])
    return keys


# Sections ----------------------------------------------------------------------------------------------------------
def sweep_section(parent: RunRecord, tree: list[RunRecord], cited: dict[str, RunRecord]) -> tuple[list[str], dict]:
    trials = [r for r in tree if r.role == "trial" and r.parent_id == parent.run_id]
    if not trials:  # a launch that stopped before its first trial (e.g. a failed setup): nothing to cite
        return [], {}
    finished = [t for t in trials if t.status == "FINISHED"]
    keys = swept_keys(parent, trials)
    objective = parent.tags.get("sweep.objective")
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "FAILED", "KILLED")}
    lines = [
        f"## Sweep `{parent.tags.get('sweep.name', parent.name)}` (study `{parent.tags.get('sweep.study', '')}`)",
        "",
        f"Parent run `{parent.run_id}` · mode `{parent.tags.get('sweep.mode', '?')}` · sampler "
        f"`{parent.tags.get('sweep.sampler', '?')}` · objective `{objective}` ({parent.tags.get('sweep.direction', '?')})"
        f" · trials: {counts['FINISHED']} finished, {counts['FAILED']} failed, {counts['KILLED']} pruned/killed",
        "",
    ]
    cited[parent.run_id] = parent
    epoch_series: dict = {}
    if finished:
        table = ablation_table(finished, keys, objective)
        lines += [f"### {table.title}", "", markdown_table(table), "", table.note, ""]
        if table.paper:
            lines += [f"What the paper found: {table.paper} What we found is the verdict below.", ""]
        for t in finished:
            cited[t.run_id] = t
        lines += [best_setting_line(finished, keys, objective, parent.tags.get("sweep.direction")), ""]
        epoch_series = _epoch_series_from_trials(finished, keys, objective)
    failed = [t for t in trials if t.status == "FAILED"]
    if failed:
        lines += ["### Failed trials", "", "| trial | parameters | error |", "|---|---|---|"]
        for t in failed:
            params = ", ".join(f"{k}={t.params.get(k)}" for k in keys)
            error = t.tags.get(SWEEP_ERROR_TAG, "").splitlines()[0] if t.tags.get(SWEEP_ERROR_TAG) else ""
            lines.append(f"| {t.trial_number} | {params} | {error.replace('|', '/')} |")
            cited[t.run_id] = t
        lines.append("")
    return lines, epoch_series


def best_setting_line(trials: list[RunRecord], keys: list[str], objective: str | None, direction: str | None) -> str:
    """"Best setting: ..." only when it leads the runner-up by more than the noise; else "tie within noise", or
    "the noise is unknown" when there is no standard error to judge by. `python -m experiments.run --multirun`
    and `sweeps.run` print the same sentence (`reporting.verdict`)."""
    metric = EVAL_KEY.match(objective or "")
    scored = setting_estimates(trials, keys, objective, metric.group(2) if metric else "") if objective else []
    if not scored:
        return f"Best setting: none to name (no finished trial logged `{objective}`)."
    ranked = sorted(scored, key=lambda s: s[1].mean, reverse=direction == "maximize")
    best, top = ranked[0]
    if len(ranked) == 1:
        return f"Only one setting ({best}): `{objective}` = {top.text(unit=True)}."
    second, runner = ranked[1]
    ahead = clearly_ahead(top, runner)
    if ahead:
        return (f"Best setting: {best}, `{objective}` = {top.text(unit=True)}; ahead of the next ({second}: "
                f"{runner.text(unit=True)}) by {top.points(runner)}, more than twice the standard error of the "
                f"difference.")
    if ahead is None:  # one run per setting and no standard error logged (a training loss, say)
        return (f"No best setting named: the noise is unknown (no standard error of `{objective}` was logged and "
                f"each setting ran once; repeat each over seeds, e.g. `seed=0,1,2`, to measure it). The top two: "
                f"{best} ({top.text(unit=True)}) and {second} ({runner.text(unit=True)}), {top.points(runner)} apart.")
    return (f"No best setting: tie within noise. The top two on `{objective}`, {best} ({top.text(unit=True)}) and "
            f"{second} ({runner.text(unit=True)}), differ by {top.points(runner)}: less than twice the standard "
            f"error of the difference.")


def _epoch_series_from_trials(trials: list[RunRecord], keys: list[str], objective: str | None) -> dict:
    """label -> [(epoch, mean %, se %)] when one swept key counts epochs (the SFT-epoch sweep)."""
    epoch_keys = [k for k in keys if k.endswith("epochs") or k.endswith("epoch")]
    if not epoch_keys:
        return {}
    ek = epoch_keys[0]
    others = [k for k in keys if k != ek and not is_seed_key(k)]
    series: dict[str, dict[float, list[RunRecord]]] = {}
    cells: dict[str, tuple[str, str]] = {}
    for task, metric in primary_metrics(trials, objective):
        for t in trials:
            key = f"eval/{task}/{metric}"
            if key not in t.metrics:
                continue
            label = f"{task} ({metric})" + "".join(f", {o}={t.params.get(o)}" for o in others)
            series.setdefault(label, {}).setdefault(float(parse_value(t.params[ek])), []).append(t)
            cells[label] = (key, metric)
    out = {}
    for label, points in series.items():
        key, metric = cells[label]
        ests = [(e, estimate(metric, key, runs)) for e, runs in sorted(points.items())]
        out[label] = [(e, c.mean * c.scale, c.se * c.scale if c.se is not None else None) for e, c in ests]
    return out


def epoch_series_from_histories(client: MlflowClient, runs: list[RunRecord], cited: dict) -> tuple[dict, Table | None]:
    """Per-epoch callback curves: eval/<task>/<metric> logged with step = epoch in one run (>= 2 points), with
    the standard error and n logged beside them at the same steps."""
    series: dict = {}
    rows: dict[tuple[str, int], dict[str, str]] = {}
    columns: list[str] = []
    for run in runs:
        for task, metric in primary_metrics([run]):
            key = f"eval/{task}/{metric}"
            history = metric_history(client, run.run_id, key)
            if len(history) < 2:
                continue
            errors = dict(metric_history(client, run.run_id, stderr_key(key)))
            ns = dict(metric_history(client, run.run_id, n_key(key)))
            label = f"{task} ({metric}), {run.name or run.run_id[:8]}"
            points = [(step, Estimate(metric, value, errors.get(step), [int(ns[step])] if step in ns else [], 1))
                      for step, value in history]
            series[label] = [(float(step), e.mean * e.scale, e.se * e.scale if e.se is not None else None)
                             for step, e in points]
            column = f"{task} ({metric})"
            if column not in columns:
                columns.append(column)
            for step, e in points:
                rows.setdefault((run.name or run.run_id, step), {})[column] = e.text()
            cited[run.run_id] = run
    if not series:
        return {}, None
    columns.sort()
    table = Table("SFT epochs × task, from the per-epoch evaluation callback", ["run", "epoch", *columns],
                  [[name, str(step), *(cells.get(c, "–") for c in columns)] for (name, step), cells in sorted(rows.items())],
                  NOTE)
    return series, table


def eval_runs_section(runs: list[RunRecord], cited: dict) -> list[str]:
    """Experiment reports: every run with final eval metrics that is not a sweep trial, one row per run."""
    evals = [r for r in runs if r.role not in ("trial", "parent") and any(EVAL_KEY.match(k) for k in r.metrics)]
    if not evals:
        return []
    columns = primary_metrics(evals)
    header = ["run", *(f"{t} ({m})" for t, m in columns)]
    rows = []
    for r in evals:
        cells = []
        for task, metric in columns:
            cell = estimate(metric, f"eval/{task}/{metric}", [r])
            cells.append("–" if cell is None else cell.text())
        rows.append([f"{r.name} (`{r.run_id[:8]}`)", *cells])
        cited[r.run_id] = r
    return ["## Evaluation runs", "", markdown_table(Table("", header, rows)), "", NOTE, ""]


def cited_section(cited: dict[str, RunRecord]) -> list[str]:
    runs = sorted(cited.values(), key=RunRecord.sort_key)
    lines = ["## Runs cited", "", "| run id | name | role | status | commit |", "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| `{r.run_id}` | {r.name} | {r.role or r.tags.get(STAGE_TAG, '')} | {r.status} | "
                     f"`{r.commit[:12]}` |")
    lines += ["", "### Configurations (MLflow params of every cited run)", ""]
    for r in runs:
        body = "\n".join(f"{k} = {r.params[k]}" for k in sorted(r.params)) or "(no params logged)"
        lines += [f"<details><summary><code>{r.run_id}</code> {r.name} (commit <code>{r.commit}</code>)</summary>",
                  "", "```", body, "```", "", "</details>", ""]
    return lines


def default_out_root(tracking_uri: str | None) -> Path:
    """`<runs directory>/reports`: beside a local SQLite store (`sqlite:///runs/mlflow.db` -> `runs/reports`),
    else `runs/reports`; generated reports never land in the tracked `reports/` folder."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).parent / "reports"
    return Path("runs") / "reports"


# Entry point ---------------------------------------------------------------------------------------------------
def build_report(
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    sweep: str | None = None,
    out_root: str | Path | None = None,
    log_artifact: bool = True,
) -> Report:
    """Write `<out_root>/<name>/report.md` (+ PNGs) for one sweep or one MLflow experiment (`out_root` default:
    `reports/` beside the store's runs, see `default_out_root`)."""
    if (experiment is None) == (sweep is None):
        raise ReportError("give exactly one of experiment=NAME or sweep=NAME")
    client = MlflowClient(tracking_uri)
    if sweep is not None:
        parents, scope = _sweep_scope(client, sweep)
        name, kind = sweep, "sweep"
    else:
        scope = fetch_runs(client, experiment_ids(client, experiment))
        parents = [r for r in scope if r.role == "parent"]
        name, kind = experiment, "experiment"
    if not scope:
        raise ReportError(f"{kind} {name!r} has no runs")
    out_dir = Path(out_root or default_out_root(tracking_uri)) / safe_name(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    cited: dict[str, RunRecord] = {}
    plots: list[Path] = []
    uri = tracking_uri or "(MLflow default)"
    lines = [f"# Report: {kind} `{name}`", "",
             f"Generated from the MLflow store `{uri}` by "
             f"`python -m reports.make --{kind} {name}` (regenerating it gives the same file).", ""]
    epoch_series: dict = {}
    for parent in parents:
        section, series = sweep_section(parent, descendants(scope, [parent.run_id]), cited)
        lines += section
        epoch_series.update(series)
    lines += eval_runs_section(scope, cited) if kind == "experiment" else []
    history_series, history_table = epoch_series_from_histories(
        client, [r for r in scope if r.role != "trial"], cited)
    if epoch_series or history_series:
        path = plot_epoch_curve({**history_series, **epoch_series}, out_dir / "sft_epochs.png")
        plots.append(path)
        lines += ["## SFT-epoch curve", "", f"![SFT epochs]({path.name})", ""]
        if history_table is not None:
            lines += [markdown_table(history_table), "", history_table.note, ""]
    training_lines, training_plots = training_section(client, scope, out_dir, cited)
    lines += training_lines
    plots += training_plots
    lines += cited_section(cited)
    markdown = "\n".join(lines).rstrip() + "\n"
    report = Report(name, out_dir, markdown, plots, sorted(cited.values(), key=RunRecord.sort_key))
    report.path.write_text(markdown)
    if log_artifact:  # an experiment report (it may hold a multirun's sweep) is never a sweep's artifact
        report.logged_to = log_report(client, report, parents if kind == "sweep" else [], scope)
    return report


REPORTS_EXPERIMENT = "reports"


def log_report(client: MlflowClient, report: Report, parents: list[RunRecord], scope: list[RunRecord]) -> list[str]:
    """Attach the report directory (`report/` artifact path) to the sweep's parent run(s); an experiment report
    goes to a run of its own in the separate `reports` experiment, so a training experiment keeps only training
    runs (and the report is never part of a scope)."""
    targets = [p.run_id for p in parents]
    if not targets:
        experiment = client.get_experiment_by_name(REPORTS_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            REPORTS_EXPERIMENT, tags=EXPERIMENT_TAGS)
        existing = client.search_runs([experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 'report' and "
                                                                      f"attributes.run_name = 'report-{report.name}'")
        run_id = existing[0].info.run_id if existing else client.create_run(
            experiment_id, run_name=f"report-{report.name}", tags={REPORT_TAG: "report"}).info.run_id
        client.set_terminated(run_id, "FINISHED")
        targets = [run_id]
    for run_id in targets:
        client.log_artifacts(run_id, str(report.out_dir), artifact_path="report")
    return targets
