"""The LightningModule and the Trainer of one stage, built from the experiment config.

Each stage's Trainer gets the shared strategy, step checkpoints (`StepCheckpoint`: finite weights only,
written atomically, the newest `ckpt_keep` kept), the non-finite guard, throughput logging, the plateau LR
switch (pretraining), and whatever the caller adds (the per-epoch evaluation of SFT comes from the layer above,
`illada_lightning/experiment.py`: training never imports evaluation).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .callbacks import LossPlateauLRSwitch, NonFiniteLossGuard, ThroughputMonitor
from .config import TrainingConfig
from .float8 import convert_to_float8
from .module import DiffusionLMModule, PretrainModule, SFTModule
from .progress import StepProgressBar
from .step_checkpoint import AtomicCheckpointIO, StepCheckpoint
from .strategy import make_strategy


def build_module(cfg: TrainingConfig, stage: str, lr_scale: float = 1.0) -> DiffusionLMModule:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    cls = PretrainModule if stage == "pretrain" else SFTModule
    module = cls(cfg.model, cfg.diffusion, section.optim, section.schedule, seed=cfg.seed, lr_scale=lr_scale,
                 activation_checkpointing=cfg.activation_checkpointing, nan_check=cfg.nan_check)
    if cfg.float8:  # before compile and FSDP, as torchtitan orders them (training/float8.py)
        convert_to_float8(module.model, cfg.accelerator)
    if cfg.compile:
        module.model.compile_blocks()
    return module


def _devices(value: str):
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def stage_callbacks(cfg: TrainingConfig, stage: str, ckpt_dir: Path) -> list[Callback]:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    callbacks: list[Callback] = [
        NonFiniteLossGuard(cfg.on_nan, ckpt_dir),
        ThroughputMonitor(section.log_every_n_steps),
        # Lightning runs checkpoint callbacks last: after the guard has looked at this step's weights.
        StepCheckpoint(ckpt_dir, section.ckpt_every_n_steps, section.ckpt_keep),
    ]
    if stage == "pretrain":
        callbacks.append(LossPlateauLRSwitch(section.schedule, section.optim.warmup_steps))
    if cfg.progress_bar:
        callbacks.append(StepProgressBar(stage, refresh_rate=max(1, section.log_every_n_steps // 2)))
    return callbacks


def make_trainer(cfg: TrainingConfig, stage: str, stage_dir: Path, logger, extra_callbacks=()) -> pl.Trainer:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    callbacks = stage_callbacks(cfg, stage, stage_dir / "checkpoints") + list(extra_callbacks)
    accumulate = section.accumulate_grad_batches
    val_every = section.val_every_n_steps
    max_epochs = -1 if stage == "pretrain" else section.epochs
    return pl.Trainer(
        accelerator=cfg.accelerator, devices=_devices(cfg.devices), num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes, precision=cfg.precision,
                               cpu_offload=cfg.fsdp_cpu_offload),
        plugins=[AtomicCheckpointIO()],
        precision=cfg.precision, max_steps=section.max_steps, max_epochs=max_epochs, max_time=section.max_time,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=section.optim.grad_clip or None, gradient_clip_algorithm="norm",
        # Validation every `val_every` optimizer steps, counted across epochs (0: only the final one).
        val_check_interval=val_every * accumulate if val_every > 0 else 10**12, check_val_every_n_epoch=None,
        limit_val_batches=section.limit_val_batches or 1.0, num_sanity_val_steps=0,
        log_every_n_steps=section.log_every_n_steps, logger=logger if logger is not None else False,
        callbacks=callbacks, enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False,  # the data modules shard batches over ranks themselves
        default_root_dir=str(stage_dir),
    )
