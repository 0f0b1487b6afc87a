"""What a stage's summary says about the whole run, carried in every checkpoint across resumes.

Without it a resumed stage reported `first_loss`, `initial_val_loss` and `wall_time_s` of the resumed part
only. The record travels in the checkpoint (`checkpoint["illada_run_record"]`); a run resumed from a
checkpoint written before the record existed is labelled instead (`summary_covers`).
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback

KEY = "illada_run_record"
FIRST_LOSSES = 100  # as many as DiffusionLMModule.first_losses keeps


class RunRecord(Callback):
    """First training losses, the validation loss before training and the wall time of earlier attempts."""

    def __init__(self):
        self.first_losses: list[tuple[int, float]] | None = None
        self.initial_val_loss: float | None = None
        self.earlier_wall_s = 0.0  # attempts before this process (from the resumed checkpoint)
        self.resumed_step: int | None = None  # the step this process resumed from (None: from the start)
        self.complete = True  # False: resumed from a checkpoint that carried no record
        self._loaded = False
        self._start = time.perf_counter()

    def wall_time_s(self) -> float:
        return self.earlier_wall_s + time.perf_counter() - self._start

    def _first(self, pl_module) -> list[tuple[int, float]]:
        """The run's first (step, loss) pairs: those recorded so far, topped up with later steps of this fit."""
        known = self.first_losses or []
        after = known[-1][0] if known else -1
        return (known + [x for x in pl_module.first_losses if x[0] > after])[:FIRST_LOSSES]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[KEY] = {"first_losses": self._first(pl_module), "initial_val_loss": self.initial_val_loss,
                           "wall_time_s": self.wall_time_s(), "complete": self.complete}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._loaded:  # a rollback inside this process: its own clock and first losses stay
            return
        self._loaded = True
        self.resumed_step = int(checkpoint.get("global_step", 0))
        record = checkpoint.get(KEY)
        if record is None:
            self.complete = False
            return
        self.first_losses = [tuple(x) for x in record["first_losses"]]
        self.initial_val_loss = record["initial_val_loss"]
        self.earlier_wall_s = float(record["wall_time_s"])
        self.complete = bool(record.get("complete", True))

    def keep_first_losses(self, pl_module) -> None:
        """After each fit (a rollback starts a new module): keep what it added to the first losses."""
        self.first_losses = self._first(pl_module)

    def scope(self, last_step: int) -> str:
        if self.complete:
            return "whole run"
        return (f"steps {self.resumed_step}-{last_step} only (resumed from a checkpoint without a run record): "
                "first_loss, initial_val_loss and wall_time_s cover this part")
