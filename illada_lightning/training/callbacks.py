"""Lightning callbacks of the training loop: the plateau LR switch, the non-finite-loss guard, the interval metrics.

They read what `DiffusionLMModule.training_step` leaves on the module each micro-batch:
`last_loss` (the loss averaged over ranks, a float; the previous micro-batch's under `nan_check=deferred`, read
without stalling the GPU), `nonfinite_step` (set when that loss was not finite and the update was skipped), and
device tensors added up without a host sync: `tokens_seen` (non-padding tokens), `flops_done` (model FLOPs) and
`mask_ratio_loss` (loss sum and rows per mask-ratio bin).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..checkpoint import CheckpointError, find_resume_checkpoint
from ..model.flops import measured_gemm_tflops
from ..runs import (
    GEMM_TFLOPS_PARAM,
    LOSS_BY_MASK_RATIO,
    LR_SWITCH_LOSS,
    LR_SWITCH_LOSS_TAG,
    LR_SWITCH_STEP,
    LR_SWITCH_TAG,
    MAX_MEMORY_GIB,
    MFU,
)
from .config import ScheduleConfig
from .finite import grads_finite, nonfinite_flag, weights_finite
from .plateau import PlateauDetector
from .schedule import RecipeLR

log = logging.getLogger(__name__)


def _recipe_scheduler(trainer: pl.Trainer) -> RecipeLR | None:
    for config in trainer.lr_scheduler_configs:
        if isinstance(config.scheduler, RecipeLR):
            return config.scheduler
    return None


def _mlflow_tag(trainer: pl.Trainer, key: str, value) -> None:
    """Set a tag on the MLflow run of this stage (rank 0; a no-op without an MLflow logger)."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.set_tag(logger.run_id, key, str(value))


class _StepLoss:
    """Averages the micro-batch losses of one optimizer step (gradient accumulation)."""

    def __init__(self):
        self.total, self.count, self.step = 0.0, 0, -1

    def add(self, trainer: pl.Trainer, pl_module) -> float | None:
        """Add this micro-batch; return the step's mean loss once the optimizer has stepped."""
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None and math.isfinite(loss):
            self.total, self.count = self.total + loss, self.count + 1
        if trainer.global_step == self.step or self.count == 0:
            return None
        self.step = trainer.global_step
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        return mean


class LossPlateauLRSwitch(Callback):
    """Switch the pretraining LR from constant to cosine decay once the smoothed loss stops falling.

    Exactly one switch per run, an event in MLflow: the metrics `train/lr_switch_step` and
    `train/lr_switch_loss` (the smoothed loss) logged once, at the step of the switch, and the tags
    `illada.lr_switch_step` / `illada.lr_switch_loss` on the stage's run (also on the run of a resumed attempt
    that switched before). Detector state and the switch are saved in checkpoints, so a resumed run continues
    on the right schedule. `schedule.switch_at_step` bypasses the detector (the scheduler is built with that
    switch step) and only logs it.
    """

    def __init__(self, schedule: ScheduleConfig, warmup_steps: int = 0):
        self.manual_step = schedule.switch_at_step
        self.enabled = schedule.plateau_switch and self.manual_step is None
        self.detector = PlateauDetector(
            smoothing=schedule.smoothing, ema_decay=schedule.ema_decay, window=schedule.window,
            patience=schedule.patience, min_delta=schedule.min_delta,
            min_steps=max(schedule.min_steps, warmup_steps),
        )
        self.switch_step: int | None = None
        self.switch_loss: float | None = None
        self._step_loss = _StepLoss()

    def on_train_start(self, trainer, pl_module) -> None:
        self._step_loss.step = trainer.global_step
        if self.switch_step is not None:  # restored from a checkpoint: this attempt's run says so too
            self._tag(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = self._step_loss.add(trainer, pl_module)
        if loss is None or self.switch_step is not None:
            return
        step = trainer.global_step
        if self.manual_step is not None:
            if step >= self.manual_step:
                self._record(trainer, self.manual_step, self.detector.smoothed() or loss)
            self.detector.update(step, loss)
            return
        if self.enabled and self.detector.update(step, loss):
            scheduler = _recipe_scheduler(trainer)
            if scheduler is None:
                raise RuntimeError("LossPlateauLRSwitch needs the RecipeLR scheduler of DiffusionLMModule")
            scheduler.switch(step)
            self._record(trainer, step, self.detector.smoothed())

    def _record(self, trainer, step: int, loss: float) -> None:
        self.switch_step, self.switch_loss = int(step), float(loss)
        log.info("LR switch to cosine decay at step %d (smoothed training loss %.4f)", step, loss)
        for logger in trainer.loggers:
            logger.log_metrics({LR_SWITCH_STEP: float(step), LR_SWITCH_LOSS: float(loss)}, step=step)
        self._tag(trainer)

    def _tag(self, trainer) -> None:
        _mlflow_tag(trainer, LR_SWITCH_TAG, self.switch_step)
        _mlflow_tag(trainer, LR_SWITCH_LOSS_TAG, f"{self.switch_loss:.6f}")

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "switch_step": self.switch_step,
                "switch_loss": self.switch_loss}

    def load_state_dict(self, state_dict: dict) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.switch_step, self.switch_loss = state_dict["switch_step"], state_dict["switch_loss"]


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss, gradient or weight; the message says what is safe to resume."""


class NonFiniteLossGuard(Callback):
    """Stop (or hand over to the rollback loop) as soon as the loss, the gradients or the weights are not finite.

    Three checks, each agreed by every rank: the loss (the module has then skipped the update), the gradients
    before the optimizer step (dropped, so the optimizer leaves the weights alone), and the weights after the
    step - a huge LR can make every weight NaN while the loss that produced the update was finite.
    - `stop`: end training; weights that are still finite are saved as `nonfinite-step=N.ckpt` next to the
      step checkpoints; poisoned weights are never saved. `describe()` says what to do next.
    - `rollback`: end this fit so the stage runner reloads the newest checkpoint with finite weights and
      continues with the LR scaled by `nan_lr_scale` (what LLaDA did after its one NaN at 1.2T tokens).

    `nan_check=deferred` (the module carries a `finite_flag`): the loss and gradient checks run on the device
    and set a sticky flag that the fused AdamW reads as `found_inf`, so the failed update and every one after
    it change nothing; the host reads the flag a step later (no sync per step) and stops as above, naming the
    step where it happened. The weights are checked on the host when that happens and before every save
    (a poisoned update shows up as a non-finite loss at the next step, whose update is then skipped).
    """

    def __init__(self, mode: str, checkpoint_dir: str | Path):
        self.mode = mode
        self.checkpoint_dir = Path(checkpoint_dir)
        self.triggered_step: int | None = None
        self.reason: str | None = None
        self.saved: Path | None = None
        self.poisoned = False  # the weights themselves are non-finite
        self._seen_step = -1

    def _trigger(self, trainer, step: int, reason: str) -> None:
        self.triggered_step, self.reason = step, reason
        trainer.should_stop = True

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(pl_module, "finite_flag", None) is not None:
            for opt in trainer.optimizers:
                if not opt.defaults.get("fused"):
                    raise ValueError("nan_check=deferred skips a non-finite update inside the fused AdamW "
                                     "(found_inf), but this optimizer is not fused: set optim.fused=true")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        flag = getattr(pl_module, "finite_flag", None)
        if flag is not None:
            bad = nonfinite_flag([p.grad for p in pl_module.parameters()], pl_module.device)
            if trainer.world_size > 1:
                bad = trainer.strategy.reduce(bad, reduce_op="sum")  # a device collective, no host sync
            flag.mark(bad, trainer.global_step, kind=2)
            for opt in trainer.optimizers:
                opt.found_inf = flag.halt  # fused AdamW: 1 -> no update, optimizer state untouched
            flag.snapshot()
            return
        if self.triggered_step is None and not grads_finite(trainer, pl_module):
            for p in pl_module.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: the weights stay as they were
            self._trigger(trainer, trainer.global_step,
                          f"the gradients became non-finite at step {trainer.global_step} (the update was skipped)")

    def _read_deferred(self, trainer, pl_module, wait: bool) -> None:
        """nan_check=deferred: trigger from the device flag (an earlier step's snapshot unless `wait`)."""
        state = pl_module.finite_flag.read(wait)
        if state is None or not state[0] or self.triggered_step is not None:
            return
        _, step, kind = state
        pl_module.nonfinite_step = step
        self.poisoned = not weights_finite(trainer, pl_module)  # once, on the host: are they safe to save?
        self._trigger(trainer, step, f"the {kind} became non-finite at step {step} (that update and the ones "
                      "after it were skipped)" if not self.poisoned else
                      f"the weights became non-finite by step {step}, where the {kind} turned non-finite")
        self._report(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "finite_flag", None) is not None:
            self._read_deferred(trainer, pl_module, wait=True)  # the last steps' flags

    def _report(self, trainer) -> None:
        log.error(self.reason)
        if self.mode == "stop" and not self.poisoned and self.saved is None:
            self.saved = self.checkpoint_dir / f"nonfinite-step={self.triggered_step:07d}.ckpt"
            trainer.save_checkpoint(self.saved)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "finite_flag", None) is not None:
            if trainer.global_step != self._seen_step:
                self._seen_step = trainer.global_step
                self._read_deferred(trainer, pl_module, wait=False)
            return
        if self.triggered_step is None:
            step = getattr(pl_module, "nonfinite_step", None)
            if step is not None:
                self._trigger(trainer, step, f"the loss became non-finite at step {step} (the update was skipped)")
            elif trainer.global_step != self._seen_step and not weights_finite(trainer, pl_module):
                self.poisoned = True
                self._trigger(trainer, trainer.global_step, f"the weights became non-finite at step "
                              f"{trainer.global_step}, after an update whose loss was finite "
                              f"({getattr(pl_module, 'last_loss', None)})")
            self._seen_step = trainer.global_step
            if self.triggered_step is None:
                return
            self._report(trainer)

    def describe(self) -> str:
        """What happened, what was saved and how to continue (`stop` mode; call after the fit)."""
        try:
            good = find_resume_checkpoint(self.checkpoint_dir.parent, finite=True)
        except CheckpointError:
            good = None
        saved = (f" The weights before the failed update (all finite) are in {self.saved}." if self.saved else
                 " The non-finite weights were not saved." if self.poisoned else "")
        return (f"training stopped: {self.reason}.{saved} The newest checkpoint "
                f"with finite weights is {good or '(none yet)'}. Continue with resume=auto and a lower LR "
                "(e.g. pretrain.optim.lr=...), or rerun with on_nan=rollback.")


class ThroughputMonitor(Callback):
    """The interval metrics, logged every `every` optimizer steps: tokens/s (non-padding tokens, all ranks),
    tokens seen, the LR, the gradient norm, the loss by mask ratio and, on GPU, MFU and peak memory.

    MFU is the model FLOPs of the interval (all ranks) per second over the bf16 GEMM rate of the devices,
    measured once per device at the start (`model.flops.measured_gemm_tflops`, logged as the param
    `perf.gemm_tflops` of rank 0's device). Everything is counted on the device per micro-batch and read here,
    at log steps only, with one host sync.
    """

    def __init__(self, every: int):
        self.every = max(1, every)
        self._t0: float | None = None
        self._paused: float | None = None
        self._tokens0 = 0.0
        self._flops0 = 0.0
        self._step0 = 0
        self.gemm_tflops: float | None = None  # summed over ranks: the denominator of MFU
        self.train_seconds = 0.0  # training time measured so far, validation excluded
        self.train_tokens = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._measure_gemm_rate(trainer, pl_module)
        pl_module.mask_ratio_loss.zero_()
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        self._tokens0, self._flops0 = self._totals(trainer, pl_module)[:2]

    def _measure_gemm_rate(self, trainer, pl_module) -> None:
        rate = measured_gemm_tflops(pl_module.device)
        if rate is None:
            return
        total = trainer.strategy.reduce(torch.tensor(rate, dtype=torch.float64, device=pl_module.device),
                                        reduce_op="sum")
        self.gemm_tflops = float(total)
        for logger in trainer.loggers:
            logger.log_hyperparams({GEMM_TFLOPS_PARAM: round(rate, 1)})
        torch.cuda.reset_peak_memory_stats(pl_module.device)  # the peak of training, not of the GEMM

    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation time is not training time: shift the interval start past it.
        if self._t0 is not None and getattr(self, "_paused", None) is not None:
            self._t0 += time.perf_counter() - self._paused
        self._paused = None

    @staticmethod
    def _totals(trainer, pl_module) -> list[float]:
        """[tokens seen, model FLOPs done, *loss sums per bin, *rows per bin], summed over ranks: one reduce."""
        packed = torch.cat([pl_module.tokens_seen.reshape(1), pl_module.flops_done.reshape(1),
                            pl_module.mask_ratio_loss.reshape(-1)])
        return trainer.strategy.reduce(packed, reduce_op="sum").tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Before clipping: the norm the clip compares against. Computed only on logging steps.
        if (trainer.global_step + 1) % self.every == 0:
            pl_module.log("train/grad_norm", pl_module.grad_norm(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step0 or step % self.every != 0 or self._t0 is None:
            return
        # A host sync to time finished work only, not queued kernels.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now, totals = time.perf_counter(), self._totals(trainer, pl_module)
        tokens, flops = totals[:2]
        elapsed = max(now - self._t0, 1e-9)
        metrics = {
            "train/tokens_per_s": (tokens - self._tokens0) / elapsed,
            "train/steps_per_s": (step - self._step0) / elapsed,
            "train/tokens_seen": tokens,
            **mask_ratio_metrics(totals[2:]),
        }
        pl_module.mask_ratio_loss.zero_()  # per interval
        scheduler = _recipe_scheduler(trainer)
        if scheduler is not None:
            metrics["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        if self.gemm_tflops:
            metrics[MFU] = (flops - self._flops0) / elapsed / (self.gemm_tflops * 1e12)
        if pl_module.device.type == "cuda":
            peak = torch.tensor(float(torch.cuda.max_memory_allocated(pl_module.device)), device=pl_module.device)
            metrics[MAX_MEMORY_GIB] = float(trainer.strategy.reduce(peak, reduce_op="max")) / 2**30
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        for logger in trainer.loggers:
            # At Lightning's step for this batch (`self.log` in training_step logs at the step before the update
            # it makes): MLflow then pairs `train/loss` with `train/tokens_seen` for a tokens x-axis.
            logger.log_metrics(metrics, step=step - 1)
        pl_module.last_throughput = metrics["train/tokens_per_s"]
        self.train_seconds += elapsed
        self.train_tokens += tokens - self._tokens0
        self._t0, self._tokens0, self._flops0, self._step0 = now, tokens, flops, step

    @property
    def mean_tokens_per_s(self) -> float | None:
        """Over every logged interval of this fit (the first interval includes start-up and compilation)."""
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else None


def mask_ratio_metrics(sums_then_counts: list[float]) -> dict[str, float]:
    """`train/loss_t<a>_<b>`: the mean row loss of each mask-ratio bin that had rows in the interval."""
    n = len(LOSS_BY_MASK_RATIO)
    sums, counts = sums_then_counts[:n], sums_then_counts[n:]
    return {name: total / count for name, total, count in zip(LOSS_BY_MASK_RATIO, sums, counts) if count > 0}
