"""Learning-rate schedules of the iLLaDA recipe, as pure functions of the optimizer step.

- Pretraining (iLLaDA §2.1): linear warmup to the peak, then constant; once the training loss stops
  decreasing (detected by `callbacks.LossPlateauLRSwitch`, or a manual `switch_at_step`), cosine decay to
  the minimum LR over `decay_steps`, then the minimum. The switch step is not known in advance, so the
  scheduler holds it as state that can be set while training and is saved in checkpoints.
- SFT (iLLaDA §2.2; LLaDA §2.3 uses the same shape): warmup, constant, then linear decay to the minimum
  over the last `decay_fraction` of the steps.

Warmup reaches the peak at step `warmup_steps - 1` (step 0 already trains at peak / warmup_steps
rather than wasting an update at LR 0).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def warmup_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup: peak * (step + 1) / warmup_steps, then the peak."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak_lr
    return peak_lr * (step + 1) / warmup_steps


def pretrain_lr(
    step: int,
    *,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    switch_step: int | None = None,
) -> float:
    """Warmup -> constant -> (from `switch_step`) cosine to `min_lr` over `decay_steps` -> `min_lr`.

    A switch requested during warmup starts the decay when warmup ends, so the decay always starts at the peak.
    """
    if switch_step is None or step < max(switch_step, warmup_steps):
        return warmup_lr(step, peak_lr, warmup_steps)
    start = max(switch_step, warmup_steps)
    progress = min(1.0, (step - start) / max(1, decay_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_decay_start(total_steps: int, decay_fraction: float) -> int:
    """First step of the final linear decay: the last `decay_fraction` of `total_steps` decays."""
    return total_steps - max(1, round(decay_fraction * total_steps)) if decay_fraction > 0 else total_steps


def sft_lr(
    step: int,
    *,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.1,
) -> float:
    """Warmup -> constant -> linear decay from the peak (at the decay start) to `min_lr` (at the last step)."""
    start = sft_decay_start(total_steps, decay_fraction)
    if step < start:
        return warmup_lr(step, peak_lr, warmup_steps)
    last = total_steps - 1
    progress = 1.0 if last <= start else min(1.0, (step - start) / (last - start))
    return peak_lr + (min_lr - peak_lr) * progress


class RecipeLR(LRScheduler):
    """The pretraining or SFT schedule as a torch scheduler, stepped once per optimizer step.

    State saved in checkpoints (every attribute but the optimizer, as for torch schedulers): the step
    counter, `switch_step` (pretraining) and `lr_scale` (lowered by the non-finite-loss rollback).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        kind: str,
        peak_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int = 0,
        total_steps: int = 0,
        decay_fraction: float = 0.1,
        switch_step: int | None = None,
        lr_scale: float = 1.0,
    ):
        if kind not in ("pretrain", "sft"):
            raise ValueError(f"schedule kind must be 'pretrain' or 'sft', got {kind!r}")
        if kind == "sft" and total_steps <= 0:
            raise ValueError(f"the SFT schedule needs total_steps > 0, got {total_steps}")
        self.kind = kind
        self.peak_lr, self.min_lr, self.warmup_steps = peak_lr, min_lr, warmup_steps
        self.decay_steps, self.total_steps, self.decay_fraction = decay_steps, total_steps, decay_fraction
        self.switch_step = switch_step
        self.lr_scale = lr_scale
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if self.kind == "pretrain":
            lr = pretrain_lr(step, peak_lr=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                             decay_steps=self.decay_steps, switch_step=self.switch_step)
        else:
            lr = sft_lr(step, peak_lr=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                        total_steps=self.total_steps, decay_fraction=self.decay_fraction)
        return lr * self.lr_scale

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    @property
    def switched(self) -> bool:
        return self.switch_step is not None

    def switch(self, step: int) -> None:
        """Start the cosine decay at `step` (once: a second call is ignored)."""
        if self.kind != "pretrain":
            raise RuntimeError("only the pretraining schedule has a decay switch")
        if self.switch_step is None:
            self.switch_step = int(step)

    def set_lr_scale(self, scale: float) -> None:
        """Scale every future LR (and the current one) by `scale`, e.g. after a non-finite loss."""
        self.lr_scale = float(scale)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
