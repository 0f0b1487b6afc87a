"""One progress bar per training stage, counted in optimizer steps: `pretrain: step 120/200 [00:20, ETA 00:13]`.

Lightning's default bar restarts every epoch and counts batches (`Epoch 3: 12/43`), which says neither how far
the stage is nor when it ends; pretraining here is step-bounded and SFT epoch-bounded, so the global step out
of `trainer.estimated_stepping_batches` (resumed runs start at their step) is the one number that means the
same in both.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n

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
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's run-id fragment: not progress
        if trainer.max_epochs and trainer.max_epochs > 1:
            metrics["epoch"] = f"{trainer.current_epoch + 1}/{trainer.max_epochs}"
        return metrics
