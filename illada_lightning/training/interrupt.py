"""Graceful stops: SIGTERM, SIGINT (Ctrl+C) and SLURM's pre-emption signal save the current step and stop.

Lightning's own SIGTERM handling ends the fit at the next batch without a checkpoint and exits 0, so a
scheduler's pre-emption lost up to `ckpt_every_n_steps` steps and was recorded as a success. Here the signal
only sets a flag; at the end of the current optimizer step every rank agrees on it, the step is checkpointed,
training stops, and the stage runner raises `TrainingInterrupted` (MLflow runs KILLED, exit code 128 + the
signal number). A second Ctrl+C stops at once. Under SLURM, SIGUSR1 (the time-limit warning) is ours too, not
Lightning's, and the job is then requeued: why and how in `slurm.py`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from .finite import agreed
from .slurm import REQUEUE_SIGNAL, under_slurm
from .step_checkpoint import StepCheckpoint

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal; the message names the checkpoint to resume from."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal
        self.requeue: str | None = None  # what became of the SLURM requeue, when one was asked for (slurm.py)


def stop_signals() -> list[int]:
    """SIGTERM and SIGINT; SIGUSR1 too under SLURM (sent before the time limit with `#SBATCH --signal=USR1@90`;
    the stop is then followed by a requeue, slurm.py)."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if under_slurm():
        signals.append(REQUEUE_SIGNAL)
    return signals


class GracefulStop(Callback):
    """Records a stop signal; at the end of the current optimizer step, checkpoints it and stops the fit."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_step: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, object] = {}
        self._seen_step = -1

    # ---------------------------------------------------------------- signal handlers
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training runs outside the main thread: stop signals keep their default behaviour")
            return
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, without waiting for the step to end
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    # ---------------------------------------------------------------- training hooks
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installed its SIGTERM handler for this fit (it would end it without a checkpoint); ours
        # takes over until the fit ends, when Lightning restores the handlers it found (ours again).
        for sig in self._previous:
            signal.signal(sig, self._handle)
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:  # mid gradient-accumulation: no optimizer step yet
            return
        self._seen_step = trainer.global_step
        if not agreed(trainer, int(self.requested)):
            return
        if self.signum is None:  # another rank received it
            self.signum = signal.SIGTERM
        ckpt = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
        self.saved = ckpt.save(trainer, pl_module)
        self.stopped_step = trainer.global_step
        trainer.should_stop = True

    def interrupted(self, stage: str) -> TrainingInterrupted:
        name = signal.Signals(self.signum).name
        if self.stopped_step is None:
            where = f"before {stage} training took a step; nothing new to save"
        elif self.saved is None:
            where = f"at {stage} step {self.stopped_step}; the weights were not finite, so nothing was saved"
        else:
            where = f"at {stage} step {self.stopped_step}; checkpoint saved: {self.saved}"
        return TrainingInterrupted(f"training interrupted by {name} {where}. Continue with resume=auto", self.signum)
