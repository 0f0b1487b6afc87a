"""PNG plots of a report (matplotlib, Agg backend: no display needed): the SFT-epoch curve (iLLaDA Fig. 1)
and the training-loss curve with the plateau LR switch marked (iLLaDA §2.1)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def plot_training_loss(curves: dict[str, list[tuple[int, float]]], switches: dict[str, int], path: Path) -> Path:
    """`curves`: label -> [(step, loss)]; `switches`: label -> step of the plateau LR switch (dashed line)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(sorted(curves)):
        points = curves[label]
        style = {**curve_style(i), "markevery": max(1, len(points) // 8)}  # a few markers, offset per curve
        style["markevery"] = (i % style["markevery"], style["markevery"])
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=label, markersize=4, **style)
        if label in switches:
            ax.axvline(switches[label], color=line.get_color(), linestyle=(0, (1, 3)), linewidth=1)
            ax.annotate(f"LR switch @ {switches[label]}", (switches[label], max(p[1] for p in points)),
                        fontsize=7, rotation=90, va="top", ha="right", color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (diffusion bound)")
    # Name the switch in the title only when one happened (vertical line per run that switched).
    ax.set_title("Training loss (vertical line: plateau LR switch)" if switches else "Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)
