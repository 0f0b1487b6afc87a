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

from ..runs import STAGE_TAG, SWEEP_ERROR_TAG, SWEEP_PARAM_PREFIX, TRAIN_LOSS
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
from .plots import plot_epoch_curve, plot_training_loss
from .tables import (
    EVAL_KEY,
    PERCENT_METRICS,
    Table,
    ablation_table,
    is_seed_key,
    markdown_table,
    mean_se,
    parse_value,
    primary_metrics,
)

LOSS_KEYS = (TRAIN_LOSS, "train/loss_step", "train_loss")
MAX_LOSS_CURVES = 12
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


def switch_step(run: RunRecord) -> int | None:
    """The plateau LR switch: a metric (`lr_switch_step`, `lr/switch_step`, ...) or a tag (`plateau_switch_step`)."""
    for source in (run.metrics, run.tags):
        for key in sorted(source):
            if "switch_step" in key:
                try:
                    return int(float(source[key]))
                except (TypeError, ValueError):
                    continue
    return None


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
        for t in finished:
            cited[t.run_id] = t
        best = _best_trial(finished, objective, parent.tags.get("sweep.direction"))
        if best is not None:
            settings = ", ".join(f"{k}={best.params.get(k)}" for k in keys)
            lines += [f"Best trial: #{best.trial_number} ({settings}): {objective} = {best.metrics[objective]:.4f} "
                      f"(run `{best.run_id}`).", ""]
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


def _best_trial(trials: list[RunRecord], objective: str | None, direction: str | None) -> RunRecord | None:
    scored = [t for t in trials if objective and objective in t.metrics]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda t: (t.metrics[objective], -(t.trial_number or 0)))


def _epoch_series_from_trials(trials: list[RunRecord], keys: list[str], objective: str | None) -> dict:
    """label -> [(epoch, mean %, se %)] when one swept key counts epochs (the SFT-epoch sweep)."""
    epoch_keys = [k for k in keys if k.endswith("epochs") or k.endswith("epoch")]
    if not epoch_keys:
        return {}
    ek = epoch_keys[0]
    others = [k for k in keys if k != ek and not is_seed_key(k)]
    series: dict[str, dict[float, list[float]]] = {}
    for task, metric in primary_metrics(trials, objective):
        for t in trials:
            key = f"eval/{task}/{metric}"
            if key not in t.metrics:
                continue
            label = f"{task} ({metric})" + "".join(f", {o}={t.params.get(o)}" for o in others)
            series.setdefault(label, {}).setdefault(float(parse_value(t.params[ek])), []).append(t.metrics[key])
    return {label: [(e, *_percent(v)) for e, v in sorted(pts.items())] for label, pts in series.items()}


def _percent(values: list[float]) -> tuple[float, float | None]:
    mean, se, _ = mean_se(values)
    return mean * 100, (se * 100 if se is not None else None)


def epoch_series_from_histories(client: MlflowClient, runs: list[RunRecord], cited: dict) -> tuple[dict, Table | None]:
    """Per-epoch callback curves: eval/<task>/<metric> logged with step = epoch in one run (>= 2 points)."""
    series: dict = {}
    rows: dict[tuple[str, int], dict[str, str]] = {}
    columns: list[str] = []
    for run in runs:
        for task, metric in primary_metrics([run]):
            history = metric_history(client, run.run_id, f"eval/{task}/{metric}")
            if len(history) < 2:
                continue
            scale = 100.0 if metric in PERCENT_METRICS else 1.0
            label = f"{task} ({metric}), {run.name or run.run_id[:8]}"
            series[label] = [(float(step), value * scale, None) for step, value in history]
            column = f"{task} ({metric})"
            if column not in columns:
                columns.append(column)
            for step, value in history:
                rows.setdefault((run.name or run.run_id, step), {})[column] = f"{value * scale:.1f}" if scale > 1 \
                    else f"{value:.4f}"
            cited[run.run_id] = run
    if not series:
        return {}, None
    columns.sort()
    table = Table("SFT epochs × task, from the per-epoch evaluation callback", ["run", "epoch", *columns],
                  [[name, str(step), *(cells.get(c, "–") for c in columns)] for (name, step), cells in sorted(rows.items())],
                  "Accuracy-like metrics in %.")
    return series, table


def loss_section(client: MlflowClient, runs: list[RunRecord], out_dir: Path, cited: dict) -> tuple[list[str], Path | None]:
    curves: dict[str, list[tuple[int, float]]] = {}
    switches: dict[str, int] = {}
    notes = []
    for run in runs:
        key = next((k for k in LOSS_KEYS if k in run.metrics), None)
        if key is None or len(curves) >= MAX_LOSS_CURVES:
            continue
        history = metric_history(client, run.run_id, key)
        if len(history) < 2:
            continue
        label = run.name or run.run_id[:8]
        curves[label] = history
        cited[run.run_id] = run
        step = switch_step(run)
        if step is not None:
            switches[label] = step
            notes.append(f"- `{label}` (run `{run.run_id}`): plateau LR switch at step {step}.")
        else:
            notes.append(f"- `{label}` (run `{run.run_id}`): no LR switch logged.")
    if not curves:
        return [], None
    path = plot_training_loss(curves, switches, out_dir / "training_loss.png")
    return ["## Training loss", "", f"![training loss]({path.name})", "", *notes, ""], path


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
            key = f"eval/{task}/{metric}"
            cells.append("–" if key not in r.metrics else
                         f"{r.metrics[key] * 100:.1f}" if metric in PERCENT_METRICS else f"{r.metrics[key]:.4f}")
        rows.append([f"{r.name} (`{r.run_id[:8]}`)", *cells])
        cited[r.run_id] = r
    return ["## Evaluation runs", "", markdown_table(Table("", header, rows)), "", "Accuracy-like metrics in %.", ""]


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


# Entry point ---------------------------------------------------------------------------------------------------
def build_report(
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    sweep: str | None = None,
    out_root: str | Path = "reports",
    log_artifact: bool = True,
) -> Report:
    """Write `<out_root>/<name>/report.md` (+ PNGs) for one sweep or one MLflow experiment."""
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
    out_dir = Path(out_root) / safe_name(name)
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
    loss_lines, loss_plot = loss_section(client, scope, out_dir, cited)
    lines += loss_lines
    if loss_plot is not None:
        plots.append(loss_plot)
    lines += cited_section(cited)
    markdown = "\n".join(lines).rstrip() + "\n"
    report = Report(name, out_dir, markdown, plots, sorted(cited.values(), key=RunRecord.sort_key))
    report.path.write_text(markdown)
    if log_artifact:
        report.logged_to = log_report(client, report, parents, scope)
    return report


def log_report(client: MlflowClient, report: Report, parents: list[RunRecord], scope: list[RunRecord]) -> list[str]:
    """Attach the report directory to the parent run(s) (`report/` artifact path)."""
    targets = [p.run_id for p in parents]
    if not targets:
        roots = [r for r in scope if not r.parent_id]
        if len(roots) == 1:
            targets = [roots[0].run_id]
        else:  # several unrelated runs: one run that holds the report (excluded from every scope)
            existing = client.search_runs([scope[0].experiment_id], filter_string=f"tags.`{REPORT_TAG}` = 'report'")
            run_id = existing[0].info.run_id if existing else client.create_run(
                scope[0].experiment_id, run_name=f"report-{report.name}", tags={REPORT_TAG: "report"}).info.run_id
            client.set_terminated(run_id, "FINISHED")
            targets = [run_id]
    for run_id in targets:
        client.log_artifacts(run_id, str(report.out_dir), artifact_path="report")
    return targets
