"""PNG plots of a report (matplotlib, Agg backend: no display needed): the SFT-epoch curve (iLLaDA Fig. 1),
the training loss against tokens seen with the plateau LR switch marked (iLLaDA §2.1), the loss by mask ratio,
and throughput / MFU.

Every plot reads in black and white: curve i gets line style and marker i (`curve_style`), and every axis
names its unit."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, StrMethodFormatter  # noqa: E402

# No software/date metadata in the files, so regenerating a report rewrites identical bytes.
PNG_METADATA = {"Software": None}
# Curve i gets style i: two runs with identical curves still show as two (solid under dashed, other markers).
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "x")


def curve_style(i: int) -> dict:
    return {"linestyle": LINESTYLES[i % len(LINESTYLES)], "marker": MARKERS[i % len(MARKERS)],
            "linewidth": max(0.8, 2.2 - 0.4 * (i % 4))}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def plot_epoch_curve(series: dict[str, list[tuple[float, float, float | None]]], path: Path,
                     ylabel: str = "accuracy (%)") -> Path:
    """`series`: label -> [(epoch, mean, standard error or None)], one line per task (and setting), with
    error bars of ± one standard error."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, label in enumerate(sorted(series)):
        points = sorted(series[label])
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        errs = [p[2] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, capsize=3, label=label, **curve_style(i))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("SFT epochs")
    ax.set_ylabel(ylabel)
    ax.set_title("SFT epoch ablation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_training_loss(curves: dict[str, list[tuple[float, float]]], switches: dict[str, float], path: Path,
                       x_label: str = "optimizer step", switch_labels: dict[str, str] | None = None) -> Path:
    """`curves`: label -> [(x, loss)]; `switches`: label -> x of the plateau LR switch (a vertical line),
    annotated with `switch_labels[label]` (default: the x value)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(sorted(curves)):
        points = curves[label]
        style = {**curve_style(i), "markevery": max(1, len(points) // 8)}  # a few markers, offset per curve
        style["markevery"] = (i % style["markevery"], style["markevery"])
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=4, **style)
        if label in switches:
            text = (switch_labels or {}).get(label, f"{switches[label]:g}")
            ax.axvline(switches[label], color=line.get_color(), linestyle=(0, (1, 3)), linewidth=1)
            ax.annotate(f"LR switch @ {text}", (switches[label], max(p[1] for p in points)),
                        fontsize=7, rotation=90, va="top", ha="right", color=line.get_color())
    ax.set_xlabel(x_label)
    ax.set_ylabel("training loss (nats/token, diffusion bound)")
    # Name the switch in the title only when one happened (vertical line per run that switched).
    ax.set_title("Training loss (vertical line: plateau LR switch)" if switches else "Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_loss_by_mask_ratio(profiles: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    """`profiles`: label -> [(mask ratio bin centre in %, mean loss)]; labels ending in ", start" are drawn
    dotted with the marker of the run they belong to (`<run>, start` / `<run>, end`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted({label.rsplit(", ", 1)[0] for label in profiles})
    for label in sorted(profiles):
        run, _, when = label.rpartition(", ")
        style = curve_style(runs.index(run))
        style["linestyle"] = ":" if when.startswith("start") else "-"
        points = sorted(profiles[label])
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=5, **style)
    ax.set_xticks([10, 30, 50, 70, 90], ["0-20", "20-40", "40-60", "60-80", "80-100"])
    ax.set_xlabel("mask ratio t (%), bins of the training rows")
    ax.set_ylabel("loss (nats/token, 1/t-weighted)")
    ax.set_title("Training loss by mask ratio (dotted: first log interval, solid: last quarter)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_throughput(tokens_per_s: dict[str, list[tuple[float, float]]], mfu: dict[str, list[tuple[float, float]]],
                    path: Path, x_label: str = "optimizer step") -> Path:
    """Training tokens/s (top) and, when any run logged it, MFU in % (bottom), against the same x."""
    panels = [("throughput (tokens/s)", tokens_per_s)] + ([("MFU (% of measured bf16 GEMM rate)", mfu)] if mfu else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels)), sharex=True, squeeze=False)
    labels = sorted(set(tokens_per_s) | set(mfu))
    for ax, (y_label, series) in zip(axes[:, 0], panels):
        for label in sorted(series):
            points = series[label]
            style = {**curve_style(labels.index(label)), "markevery": max(1, len(points) // 8)}
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=4, **style)
        ax.set_ylabel(y_label, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    axes[-1, 0].set_xlabel(x_label)
    axes[0, 0].set_title("Training throughput" + (" and MFU" if mfu else " (no run logged MFU: a GPU-only metric)"))
    return _save(fig, path)
