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


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def plot_epoch_curve(series: dict[str, list[tuple[float, float, float | None]]], path: Path,
                     ylabel: str = "accuracy (%)") -> Path:
    """`series`: label -> [(epoch, mean, standard error or None)], one line per task (and setting)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted(series):
        points = sorted(series[label])
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        errs = [p[2] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("SFT epochs")
    ax.set_ylabel(ylabel)
    ax.set_title("SFT epoch ablation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_loss(curves: dict[str, list[tuple[int, float]]], switches: dict[str, int], path: Path) -> Path:
    """`curves`: label -> [(step, loss)]; `switches`: label -> step of the plateau LR switch (dashed line)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in sorted(curves):
        points = curves[label]
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1)
        if label in switches:
            ax.axvline(switches[label], color=line.get_color(), linestyle="--", linewidth=1)
            ax.annotate(f"LR switch @ {switches[label]}", (switches[label], max(p[1] for p in points)),
                        fontsize=7, rotation=90, va="top", ha="right", color=line.get_color())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (diffusion bound)")
    ax.set_title("Training loss (dashed: plateau LR switch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
