"""The training sections of a report, from the MLflow histories of the stage runs: the loss against tokens seen
with the plateau LR switch marked (iLLaDA §2.1), the loss by mask ratio (the Eq. 1 loss of the rows whose t
falls in each fifth of [0, 1]), and throughput with MFU, peak memory and the measured GEMM rate.

Tokens seen is the x axis whenever every run logged `train/tokens_seen` (runs with other batch sizes or
sequence lengths then line up by data, not by step); the optimizer step otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from ..runs import (
    GEMM_TFLOPS_PARAM,
    LOSS_BY_MASK_RATIO,
    LR_SWITCH_STEP,
    LR_SWITCH_TAG,
    MAX_MEMORY_GIB,
    MFU,
    TOKENS_PER_S,
    TOKENS_SEEN,
    TRAIN_LOSS,
)
from .collect import RunRecord, metric_history
from .plots import plot_loss_by_mask_ratio, plot_throughput, plot_training_loss

LOSS_KEYS = (TRAIN_LOSS, "train/loss_step", "train_loss")
MAX_LOSS_CURVES = 12
BIN_CENTRES = [100.0 * (k + 0.5) / len(LOSS_BY_MASK_RATIO) for k in range(len(LOSS_BY_MASK_RATIO))]
BIN_NAMES = [f"t {100 * k // len(LOSS_BY_MASK_RATIO)}-{100 * (k + 1) // len(LOSS_BY_MASK_RATIO)}%"
             for k in range(len(LOSS_BY_MASK_RATIO))]
TOKEN_UNITS = ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands"))


def switch_step(run: RunRecord) -> int | None:
    """The plateau LR switch: the metric `train/lr_switch_step` or the tag `illada.lr_switch_step`, else any
    metric or tag named like one (older stores: `lr_switch_step`, `plateau_switch_step`, ...)."""
    values = [source[key] for source, key in ((run.metrics, LR_SWITCH_STEP), (run.tags, LR_SWITCH_TAG))
              if key in source]
    values += [source[key] for source in (run.metrics, run.tags) for key in sorted(source) if "switch_step" in key]
    for value in values:
        try:
            return int(float(value))
        except (TypeError, ValueError):
            continue
    return None


@dataclass
class RunCurves:
    """What the training sections read of one run."""

    run: RunRecord
    label: str
    loss: list[tuple[int, float]]
    tokens: list[tuple[int, float]] = field(default_factory=list)  # (step, tokens seen)
    bins: list[list[tuple[int, float]]] = field(default_factory=list)  # per mask-ratio bin: (step, loss)
    tokens_per_s: list[tuple[int, float]] = field(default_factory=list)
    mfu: list[tuple[int, float]] = field(default_factory=list)
    memory: list[tuple[int, float]] = field(default_factory=list)

    def tokens_at(self, step: float) -> float:
        """Tokens seen at `step`, interpolated in the logged history (none before step 0: a run logs the tokens
        seen at the step of the interval's last batch, as Lightning logs its loss), and extrapolated at the last
        logged rate past its end."""
        steps = [-1] + [s for s, _ in self.tokens]
        seen = [0.0] + [v for _, v in self.tokens]
        if step > steps[-1] and steps[-1] > steps[-2]:
            return seen[-1] + (step - steps[-1]) * (seen[-1] - seen[-2]) / (steps[-1] - steps[-2])
        return float(np.interp(step, steps, seen))


def load_curves(client: MlflowClient, runs: list[RunRecord]) -> list[RunCurves]:
    curves = []
    for run in runs:
        key = next((k for k in LOSS_KEYS if k in run.metrics), None)
        if key is None or len(curves) >= MAX_LOSS_CURVES:
            continue
        loss = metric_history(client, run.run_id, key)
        if len(loss) < 2:
            continue
        history = {name: metric_history(client, run.run_id, name) if name in run.metrics else []
                   for name in (TOKENS_SEEN, TOKENS_PER_S, MFU, MAX_MEMORY_GIB, *LOSS_BY_MASK_RATIO)}
        curves.append(RunCurves(run, run.name or run.run_id[:8], loss, history[TOKENS_SEEN],
                                [history[name] for name in LOSS_BY_MASK_RATIO], history[TOKENS_PER_S],
                                history[MFU], history[MAX_MEMORY_GIB]))
    return curves


def _x_axis(curves: list[RunCurves]):
    """(step -> x for a run, x label): tokens seen in a readable unit when every run logged them."""
    if not all(c.tokens for c in curves):
        return (lambda c, step: float(step)), "optimizer step"
    top = max(v for c in curves for _, v in c.tokens)
    scale, unit = next(((s, u) for s, u in TOKEN_UNITS if top >= s), (1.0, ""))
    label = f"tokens seen ({unit})" if unit else "tokens seen"
    return (lambda c, step: c.tokens_at(step) / scale), label


def loss_lines(curves: list[RunCurves], out_dir: Path) -> tuple[list[str], Path]:
    x_of, x_label = _x_axis(curves)
    series, switches, switch_labels, notes = {}, {}, {}, []
    for c in curves:
        series[c.label] = [(x_of(c, step), value) for step, value in c.loss]
        step = switch_step(c.run)
        if step is None:
            notes.append(f"- `{c.label}` (run `{c.run.run_id}`): no LR switch logged.")
            continue
        switches[c.label], switch_labels[c.label] = x_of(c, step), f"step {step}"
        where = f" ({c.tokens_at(step):,.0f} tokens seen)" if c.tokens else ""
        notes.append(f"- `{c.label}` (run `{c.run.run_id}`): plateau LR switch at step {step}{where}.")
    path = plot_training_loss(series, switches, out_dir / "training_loss.png", x_label, switch_labels)
    return ["## Training loss", "", f"![training loss]({path.name})", "", *notes, ""], path


def _profile(bins: list[list[tuple[int, float]]], first: bool) -> tuple[list[float | None], tuple[int, int]]:
    """Per bin: the value of the first log interval, or the mean over the last quarter of the logged steps;
    and the step range it covers."""
    steps = sorted({s for history in bins for s, _ in history})
    lo, hi = (steps[0], steps[0]) if first else (steps[int(0.75 * (len(steps) - 1))], steps[-1])
    values = []
    for history in bins:
        picked = [v for s, v in history if lo <= s <= hi]
        values.append(sum(picked) / len(picked) if picked else None)
    return values, (lo, hi)


def mask_ratio_lines(curves: list[RunCurves], out_dir: Path) -> tuple[list[str], Path | None]:
    with_bins = [c for c in curves if any(c.bins)]
    if not with_bins:
        return [], None
    profiles, rows = {}, []
    for c in with_bins:
        for when, first in (("start", True), ("end", False)):
            values, (lo, hi) = _profile(c.bins, first)
            profiles[f"{c.label}, {when}"] = [(x, v) for x, v in zip(BIN_CENTRES, values) if v is not None]
            steps = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
            rows.append(f"| {c.label} | {steps} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    path = plot_loss_by_mask_ratio(profiles, out_dir / "loss_by_mask_ratio.png")
    header = "| run | logged at | " + " | ".join(BIN_NAMES) + " |"
    return ["## Loss by mask ratio", "", f"![loss by mask ratio]({path.name})", "",
            "The 1/t-weighted loss (nats/token) of the training rows whose mask ratio t fell in each bin, "
            f"averaged over the log interval (`{LOSS_BY_MASK_RATIO[0]}` ... `{LOSS_BY_MASK_RATIO[-1]}`): the "
            "first interval, and the mean over the last quarter of the logged steps.", "",
            header, "|---|---|" + "---|" * len(BIN_NAMES), *rows, ""], path


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _steady(history: list[tuple[int, float]]) -> list[float]:
    """The logged values without the first interval (start-up, compilation) when there are others."""
    return [v for _, v in (history[1:] if len(history) > 1 else history)]


def throughput_lines(curves: list[RunCurves], out_dir: Path) -> tuple[list[str], Path | None]:
    with_speed = [c for c in curves if c.tokens_per_s]
    if not with_speed:
        return [], None
    x_of, x_label = _x_axis(with_speed)
    speed = {c.label: [(x_of(c, s), v) for s, v in c.tokens_per_s] for c in with_speed}
    mfu = {c.label: [(x_of(c, s), 100.0 * v) for s, v in c.mfu] for c in with_speed if c.mfu}
    path = plot_throughput(speed, mfu, out_dir / "throughput.png", x_label)
    rows = []
    for c in with_speed:
        tokens_per_s = _mean(_steady(c.tokens_per_s))
        mfu_mean = _mean(_steady(c.mfu))
        memory = max((v for _, v in c.memory), default=None)
        gemm = c.run.params.get(GEMM_TFLOPS_PARAM)
        rows.append(f"| {c.label} | {tokens_per_s:,.0f} | " + (f"{100 * mfu_mean:.1f}%" if mfu_mean is not None else "–")
                    + f" | {'–' if memory is None else f'{memory:.1f}'} | {gemm or '–'} |")
    note = ("MFU: model FLOPs (`model/flops.py`) per second over the bf16 GEMM rate measured on the device at "
            f"start-up (`{GEMM_TFLOPS_PARAM}`); logged on GPU runs only." if mfu else
            "MFU and peak memory are logged on GPU runs only (none of these runs has them).")
    return ["## Throughput", "", f"![throughput]({path.name})", "",
            "| run | tokens/s (mean) | MFU (mean) | peak memory (GiB) | GEMM rate (TFLOP/s) |", "|---|---|---|---|---|",
            *rows, "", f"Means over the logged intervals after the first (start-up, compilation). {note}", ""], path


def training_section(client: MlflowClient, runs: list[RunRecord], out_dir: Path,
                     cited: dict) -> tuple[list[str], list[Path]]:
    """The Markdown lines and PNGs of the training sections (nothing when no run logged a loss curve)."""
    curves = load_curves(client, runs)
    if not curves:
        return [], []
    for c in curves:
        cited[c.run.run_id] = c.run
    lines, loss_plot = loss_lines(curves, out_dir)
    plots = [loss_plot]
    for section in (mask_ratio_lines, throughput_lines):
        more, path = section(curves, out_dir)
        lines += more
        plots += [path] if path is not None else []
    return lines, plots
