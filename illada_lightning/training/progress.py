"""One progress bar per training stage, counted in optimizer steps: `pretrain: step 120/200 [00:20, ETA 00:13]`.

Lightning's default bar restarts every epoch and counts batches (`Epoch 3: 12/43`), which says neither how far
the stage is nor when it ends; pretraining here is step-bounded and SFT epoch-bounded, so the global step out
of `trainer.estimated_stepping_batches` (resumed runs start at their step) is the one number that means the
same in both.

Written to a file or a pipe (stdout not a terminal), a bar's carriage-return redraws pile up as fragments (29 KB
for the README's multirun), so `progress_callback` picks `StepProgressLines` there: the same numbers as plain
lines, about ten per stage (and at least one a minute), plus one per validation.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from tqdm import tqdm

BAR_FORMAT = "{desc}step {n_fmt}/{total_fmt} {bar:16} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]"


class StepProgressBar(TQDMProgressBar):
    def __init__(self, stage: str, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.stage = stage

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format, bar.unit = BAR_FORMAT, "step"
        return bar

    def on_train_start(self, trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=int(trainer.estimated_stepping_batches))
        bar.initial = bar.n = trainer.global_step  # a resumed stage counts on (and its ETA uses only new steps)
        bar.set_description(self.stage)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar for the whole stage: no per-epoch reset

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        return stage_metrics(super().get_metrics(trainer, pl_module), trainer)


def stage_metrics(metrics: dict[str, Any], trainer) -> dict[str, Any]:
    metrics.pop("v_num", None)  # the logger's run-id fragment: not progress
    if trainer.max_epochs and trainer.max_epochs > 1:
        metrics["epoch"] = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
    return metrics


class StepProgressLines(ProgressBar):
    """`pretrain: step 120/200 (60%) [00:21, ETA 00:14, 5.71 step/s] train/loss=6.21`, one line per tenth of the
    stage or per `every_s` seconds, whichever comes first, and `pretrain: step 120/200 validation: val/loss=6.61`."""

    def __init__(self, stage: str, n_lines: int = 10, every_s: float = 60.0):
        super().__init__()
        self.stage, self.n_lines, self.every_s = stage, n_lines, every_s
        self._enabled = True
        self._total = self._start_step = self._printed_step = 0
        self._start = self._printed_at = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, *_: Any) -> None:
        self._total = int(trainer.estimated_stepping_batches)
        self._start_step = self._printed_step = trainer.global_step  # a resumed stage counts on
        self._start = self._printed_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._printed_step:
            return
        mark = max(1, self._total // self.n_lines)
        due = step // mark > self._printed_step // mark or step >= self._total
        if due or time.monotonic() - self._printed_at >= self.every_s:
            self._line(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.global_step != self._printed_step:
            self._line(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        shown = {k: v for k, v in trainer.callback_metrics.items() if str(k).startswith("val")}
        if shown:  # the validation before training comes before the stage's total is known
            at = f"{trainer.global_step}/{self._total}" if self._total else str(trainer.global_step)
            print(f"{self.stage}: step {at} validation: {_metrics_text(shown)}", flush=True)

    def _line(self, trainer, pl_module) -> None:
        step, now = trainer.global_step, time.monotonic()
        elapsed, done = now - self._start, step - self._start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = tqdm.format_interval((self._total - step) / rate) if rate else "?"
        speed = f"{rate:.2f} step/s" if rate else "? step/s"
        percent = f" ({100 * step // self._total}%)" if self._total else ""
        metrics = stage_metrics(self.get_metrics(trainer, pl_module), trainer)
        print(f"{self.stage}: step {step}/{self._total}{percent} [{tqdm.format_interval(elapsed)}, ETA {eta}, "
              f"{speed}] {_metrics_text(metrics)}".rstrip(), flush=True)
        self._printed_step, self._printed_at = step, now


def _metrics_text(metrics: dict) -> str:
    def value(v: Any) -> str:
        v = v.item() if hasattr(v, "item") else v
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in metrics.items())


def progress_callback(stage: str, refresh_rate: int = 1) -> ProgressBar:
    """The stage's bar in a terminal; plain lines when stdout goes to a file or a pipe."""
    isatty = getattr(sys.stdout, "isatty", None)
    if callable(isatty) and isatty():
        return StepProgressBar(stage, refresh_rate=refresh_rate)
    return StepProgressLines(stage)
