"""Tables laid out like the papers' ablations: one row per swept setting, one column per task.

iLLaDA Table 4 (scoring rule × PIQA/ARC-C/HellaSwag), LLaDA Table 7 (block length × task), LLaDA Table 9
(remasking × task) and the SFT-epoch numbers behind iLLaDA Fig. 1 all share this shape. Every accuracy comes
with its standard error and n (the items evaluated): for one run, the binomial standard error the evaluation
logged (`eval/<task>/<metric>_stderr`, `eval/<task>/n`); for runs that differ only in a seed key (repeats of
one setting), their mean ± the larger of the spread over runs (std with ddof=1 / sqrt k) and the pooled
binomial error. Accuracy-like metrics are printed in percent with one decimal, as the papers print them, in the
tables and in the text alike. A setting is called best only when it leads the next by more than twice the
standard error of the difference; otherwise the report says "tie within noise".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .collect import RunRecord

PERCENT_METRICS = ("acc", "acc_norm", "accuracy", "exact_match", "em", "f1")
NOTE = ("Accuracy-like metrics in %, ± standard error (binomial, from the n items evaluated; for several runs of "
        "a setting, the larger of that and their spread).")
LOSS_NOTE = ("Final losses as training logged them (lower is better); a setting with several runs (seeds) shows "
             "their mean ± standard error of the mean, a single run has none.")
PRIMARY_ORDER = ("acc", "exact_match", "acc_norm", "accuracy", "em", "f1")
EVAL_KEY = re.compile(r"^eval/([^/]+)/([^/]+)$")

SCORING_RULE = ("Scoring rule × task (layout of iLLaDA Table 4)",
                "iLLaDA Table 4 (8B base): confidence scoring beats likelihood on every task, by 0.6-2.3 points "
                "(PIQA 78.5 vs 77.2, ARC-C 60.8 vs 60.2, HellaSwag 76.6 vs 74.3).")
# Which paper table a swept key mirrors (matched on the key's last component, or its end): its title, and what
# the paper found there, printed beside ours.
ABLATIONS = (
    ("scoring_rule", *SCORING_RULE),
    ("scoring.rule", *SCORING_RULE),
    ("sampler.cache", "Decoding cache × threshold × task (Fast-dLLM-style speed/quality trade-off)",
     "Fast-dLLM (Wu et al. 2025): the block cache and confidence-threshold parallel decoding speed generation up "
     "several-fold at about the same accuracy; lower thresholds trade accuracy for speed."),
    ("block_length", "Block length × task (layout of LLaDA Table 7)",
     "LLaDA Table 7 (8B base): with LLaDA's block sampling, block lengths 2-32 stay within about a point of each "
     "other on BBH/GSM8K/Math (GSM8K 70.0-70.3); pure diffusion is best overall (GSM8K 70.3, HumanEval 35.4 "
     "against 26.2-32.3)."),
    ("remasking", "Remasking strategy × task (layout of LLaDA Table 9)",
     "LLaDA Table 9: low-confidence remasking consistently outperforms random remasking (GSM8K 70.0 vs 21.3, BBH "
     "45.0 vs 32.1)."),
    ("epochs", "SFT epochs × task (the numbers behind iLLaDA Fig. 1)",
     "iLLaDA Fig. 1: accuracy generally improves with more SFT epochs, up to the 12 they trained."),
    ("masking", "SFT masking × task (iLLaDA §2.2 whole window vs LLaDA §2.3 response only)",
     "iLLaDA §2.2 masks the whole window (prompt, response and EOS), as in pre-training, for its 8B model; the "
     "paper reports no ablation against LLaDA's response-only masking."),
)


def paper_ablation(keys: list[str]) -> tuple[str, str] | None:
    """(title, what the paper found) of the paper table the swept `keys` mirror; None: no paper table."""
    for needle, title, finding in ABLATIONS:
        if any(k.rsplit(".", 1)[-1] == needle or k.endswith(needle) for k in keys):
            return title, finding
    return None


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    paper: str = ""  # what the paper found for this ablation (empty: no paper table)


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


@dataclass
class Estimate:
    """One cell: mean, standard error (None: unknown), items per run and how many runs."""

    metric: str
    mean: float
    se: float | None
    n: list[int]
    runs: int

    @property
    def scale(self) -> float:
        return 100.0 if self.metric in PERCENT_METRICS else 1.0

    def text(self, with_n: bool = True, unit: bool = False) -> str:
        """`60.1 ± 1.2 (n=200)` in tables; `60.1 ± 1.2 %, n=200` in sentences (`unit=True`)."""
        digits = 1 if self.scale > 1 else 4
        out = f"{self.mean * self.scale:.{digits}f}"
        if self.se is not None:
            out += f" ± {self.se * self.scale:.{digits}f}"
        if unit and self.scale > 1:
            out += " %"
        if with_n and (self.n or self.scale > 1):  # a loss has no item count to miss
            out += f", {self.n_text()}" if unit else f" ({self.n_text()})"
        return out

    def points(self, other: Estimate) -> str:
        """The gap to `other` in the table's unit (percentage points for accuracies)."""
        gap = abs(self.mean - other.mean) * self.scale
        return f"{gap:.1f} points" if self.scale > 1 else f"{gap:.4f}"

    def n_text(self) -> str:
        if not self.n:
            return "n unknown"
        n = f"n={self.n[0]}" if min(self.n) == max(self.n) else f"n={min(self.n)}–{max(self.n)}"
        return n if self.runs == 1 else f"{n}, {self.runs} runs"


def stderr_key(key: str) -> str:
    return f"{key}_stderr"


def n_key(key: str) -> str:
    """`eval/<task>/n` for `eval/<task>/<metric>` (None-like '' for other metrics)."""
    m = EVAL_KEY.match(key)
    return f"eval/{m.group(1)}/n" if m else ""


def estimate(metric: str, key: str, runs: list[RunRecord]) -> Estimate | None:
    """The cell for `key` over `runs` (repeats of one setting); None when no run has the metric."""
    have = [r for r in runs if key in r.metrics]
    if not have:
        return None
    mean, spread, k = mean_se([r.metrics[key] for r in have])
    binomial = [r.metrics[stderr_key(key)] for r in have if stderr_key(key) in r.metrics]
    pooled = math.sqrt(sum(b * b for b in binomial)) / k if len(binomial) == k else None
    known = [v for v in (spread, pooled) if v is not None]
    ns = [int(r.metrics[n_key(key)]) for r in have if n_key(key) in r.metrics]
    return Estimate(metric, mean, max(known) if known else None, ns, k)


def format_cell(metric: str, values: list[float]) -> str:
    """Mean ± spread of bare values (no n known): kept for callers that only have numbers."""
    if not values:
        return "–"
    mean, se, _ = mean_se(values)
    return Estimate(metric, mean, se, [], len(values)).text(with_n=False)


def clearly_ahead(best: Estimate, other: Estimate) -> bool | None:
    """Whether `best` leads `other` by more than twice the standard error of the difference (None: unknown)."""
    if best.se is None or other.se is None:
        return None
    return abs(best.mean - other.mean) > 2 * math.sqrt(best.se ** 2 + other.se ** 2)


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


def title_for(keys: list[str], metric: str | None = None) -> str:
    """The paper table a swept key mirrors; `metric` (no task columns: a loss) titles `val/loss by <keys>`."""
    if metric:
        return f"`{metric}` by {' × '.join(keys)}"
    ablation = paper_ablation(keys)
    if ablation is None:
        return f"{' × '.join(keys)} × task"
    return ablation[0] if len(keys) == 1 else f"{ablation[0]}, by {', '.join(keys)}"


def ablation_table(trials: list[RunRecord], keys: list[str], objective: str | None = None) -> Table:
    """Rows: each combination of the non-seed swept `keys`; columns: tasks; cells: mean ± s.e. over seeds."""
    dims = [k for k in keys if not is_seed_key(k)]
    seeds = [k for k in keys if is_seed_key(k)]
    columns = primary_metrics(trials, objective)
    loss_only = not columns and bool(objective)
    if loss_only:  # a search on a training metric: one column, the objective itself
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
            cell = estimate(metric, key, group)
            cells.append("–" if cell is None else cell.text())
        rows.append([*(str(v) for v in combo), *cells, str(len(group))])
    header = [*dims, *(f"{task} ({metric})" if task else metric for task, metric in columns), "runs"]
    note = LOSS_NOTE if loss_only else NOTE
    if seeds and max_n > 1:
        note += f" Rows with several runs (over {', '.join(seeds)}; count in the last column): their mean."
    return Table(title_for(dims or keys, objective if loss_only else None), header, rows, note,
                 "" if loss_only else (paper_ablation(dims or keys) or ("", ""))[1])


def setting_estimates(trials: list[RunRecord], keys: list[str], key: str, metric: str) -> list[tuple[str, Estimate]]:
    """(settings text, estimate of `key`) per combination of the non-seed swept keys."""
    dims = [k for k in keys if not is_seed_key(k)] or keys
    groups: dict[tuple, list[RunRecord]] = {}
    for t in trials:
        groups.setdefault(tuple(t.params.get(k, "") for k in dims), []).append(t)
    out = []
    for combo, group in groups.items():
        cell = estimate(metric, key, group)
        if cell is not None:
            out.append((", ".join(f"{k}={v}" for k, v in zip(dims, combo)), cell))
    return out


def markdown_table(table: Table) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(table.header), "|" + "|".join("---" for _ in table.header) + "|"]
    out += [line(r) for r in table.rows]
    return "\n".join(out)
