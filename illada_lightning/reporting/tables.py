"""Tables laid out like the papers' ablations: one row per swept setting, one column per task.

iLLaDA Table 4 (scoring rule × PIQA/ARC-C/HellaSwag), LLaDA Table 7 (block length × task), LLaDA Table 9
(remasking × task) and the SFT-epoch numbers behind iLLaDA Fig. 1 all share this shape. Runs that differ only
in a seed key are repeats of one setting: the cell is their mean ± standard error (std with ddof=1 / sqrt n).
Accuracy-like metrics are printed in percent with one decimal, as the papers print them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .collect import RunRecord

PERCENT_METRICS = ("acc", "acc_norm", "accuracy", "exact_match", "em", "f1")
PRIMARY_ORDER = ("acc", "exact_match", "acc_norm", "accuracy", "em", "f1")
EVAL_KEY = re.compile(r"^eval/([^/]+)/([^/]+)$")

# Which paper table a swept key mirrors (matched on the key's last component).
TITLES = (
    ("scoring_rule", "Scoring rule × task (layout of iLLaDA Table 4)"),
    ("scoring.rule", "Scoring rule × task (layout of iLLaDA Table 4)"),
    ("sampler.cache", "Decoding cache × threshold × task (Fast-dLLM-style speed/quality trade-off)"),
    ("block_length", "Block length × task (layout of LLaDA Table 7)"),
    ("remasking", "Remasking strategy × task (layout of LLaDA Table 9)"),
    ("epochs", "SFT epochs × task (the numbers behind iLLaDA Fig. 1)"),
)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def is_seed_key(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def mean_se(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, standard error of the mean (None for a single value) and n."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n), n


def format_cell(metric: str, values: list[float]) -> str:
    if not values:
        return "–"
    mean, se, _ = mean_se(values)
    scale, digits = (100.0, 1) if metric in PERCENT_METRICS else (1.0, 4)
    text = f"{mean * scale:.{digits}f}"
    return text if se is None else f"{text} ± {se * scale:.{digits}f}"


def primary_metrics(runs: list[RunRecord], objective: str | None = None) -> list[tuple[str, str]]:
    """[(task, metric)] columns: per task the objective's metric if it has it, else the first of PRIMARY_ORDER."""
    per_task: dict[str, set[str]] = {}
    for run in runs:
        for key in run.metrics:
            m = EVAL_KEY.match(key)
            if m and not m.group(2).endswith("stderr") and m.group(2) not in ("n", "seconds"):
                per_task.setdefault(m.group(1), set()).add(m.group(2))
    wanted = EVAL_KEY.match(objective or "")
    columns = []
    for task in sorted(per_task):
        names = per_task[task]
        if wanted and wanted.group(2) in names:
            columns.append((task, wanted.group(2)))
            continue
        columns.append((task, next((n for n in PRIMARY_ORDER if n in names), sorted(names)[0])))
    return columns


def parse_value(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _row_order(values: list) -> list:
    """Numbers ascending; otherwise the order the trials ran in (the YAML's order for grids)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(set(values))
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def title_for(keys: list[str]) -> str:
    for needle, title in TITLES:
        if any(k.rsplit(".", 1)[-1] == needle or k.endswith(needle) for k in keys):
            return title if len(keys) == 1 else f"{title}, by {', '.join(keys)}"
    return f"{' × '.join(keys)} × task"


def ablation_table(trials: list[RunRecord], keys: list[str], objective: str | None = None) -> Table:
    """Rows: each combination of the non-seed swept `keys`; columns: tasks; cells: mean ± s.e. over seeds."""
    dims = [k for k in keys if not is_seed_key(k)]
    seeds = [k for k in keys if is_seed_key(k)]
    columns = primary_metrics(trials, objective)
    if not columns and objective:  # a search on a training metric: one column, the objective itself
        columns = [("", objective)]
    rows_values = [tuple(parse_value(t.params.get(k, "")) for k in dims) for t in trials]
    order = [_row_order([rv[i] for rv in rows_values]) for i in range(len(dims))]
    combos = sorted(set(rows_values), key=lambda rv: tuple(order[i].index(v) for i, v in enumerate(rv)))
    rows = []
    max_n = 1
    for combo in combos:
        group = [t for t, rv in zip(trials, rows_values) if rv == combo]
        max_n = max(max_n, len(group))
        cells = []
        for task, metric in columns:
            key = f"eval/{task}/{metric}" if task else metric
            cells.append(format_cell(metric, [t.metrics[key] for t in group if key in t.metrics]))
        rows.append([*(str(v) for v in combo), *cells, str(len(group))])
    header = [*dims, *(f"{task} ({metric})" if task else metric for task, metric in columns), "runs"]
    note = "Accuracy-like metrics in %."
    if seeds and max_n > 1:
        note += f" Mean ± standard error over {', '.join(seeds)} (runs per row in the last column)."
    return Table(title_for(dims or keys), header, rows, note)


def markdown_table(table: Table) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(table.header), "|" + "|".join("---" for _ in table.header) + "|"]
    out += [line(r) for r in table.rows]
    return "\n".join(out)
