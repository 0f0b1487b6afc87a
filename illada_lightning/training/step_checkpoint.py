"""Periodic step checkpoints that are never partial, never poisoned and never unbounded.

`StepCheckpoint` replaces Lightning's ModelCheckpoint for training runs: every `every` optimizer steps (and
when asked: a graceful stop, the end of training) it checks that the weights are finite, saves
`step=NNNNNNN.ckpt` through `AtomicCheckpointIO` (temporary file, fsync, rename), re-points `last.ckpt` and
keeps the newest `keep` step checkpoints. ModelCheckpoint could delete the previous step file before
re-linking (a dangling `last.ckpt` after a crash) and saved whatever the weights held.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from ..checkpoint import atomic_write, link_last, prune_step_checkpoints
from .finite import weights_finite

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, written atomically; OS errors become one CheckpointError naming
    the path (`error: cannot write .../step=0000010.ckpt: No space left on device`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


class StepCheckpoint(Checkpoint):
    """Save `step=N.ckpt` every `every` optimizer steps (0: only on request), keeping the newest `keep`."""

    def __init__(self, ckpt_dir: str | Path, every: int, keep: int):
        self.ckpt_dir, self.every, self.keep = Path(ckpt_dir), every, max(1, keep)
        self.last_saved: Path | None = None
        self.refused_step: int | None = None  # a save skipped because the weights were not finite
        self._seen_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of gradient accumulation: no new weights yet
            return
        self._seen_step = step
        if self.every > 0 and step % self.every == 0:
            self.save(trainer, pl_module)

    def path_for(self, step: int) -> Path:
        return self.ckpt_dir / f"step={step:07d}.ckpt"

    def save(self, trainer, pl_module) -> Path | None:
        """Checkpoint the current step (every rank calls it); None when the weights are not finite."""
        path = self.path_for(trainer.global_step)
        if self.last_saved == path:
            return path
        if not weights_finite(trainer, pl_module):
            self.refused_step = trainer.global_step
            log.error("not saving %s: the weights hold NaN/inf", path)
            return None
        flag = getattr(pl_module, "finite_flag", None)
        state = flag.read(wait=True) if flag is not None else None
        if state is not None and state[0]:  # nan_check=deferred: updates were skipped since a non-finite value
            self.refused_step = trainer.global_step
            log.error("not saving %s: the %s became non-finite at step %d", path, state[2], state[1])
            return None
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("step-checkpoint")
        if trainer.is_global_zero:
            link_last(self.ckpt_dir, path)
            for old in prune_step_checkpoints(self.ckpt_dir, self.keep):
                log.info("removed %s (ckpt_keep=%d)", old, self.keep)
        self.last_saved = path
        return path
