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

from ..logs import reapply_logging
from .callbacks import LossPlateauLRSwitch, NonFiniteLossGuard, ThroughputMonitor
from .config import TrainingConfig
from .float8 import convert_to_float8
from .lora import stage_lora, trainer_precision
from .module import DiffusionLMModule, PretrainModule, SFTModule
from .progress import progress_callback
from .slurm import cluster_environment
from .step_checkpoint import AtomicCheckpointIO, StepCheckpoint
from .strategy import make_strategy, world_size


def build_module(cfg: TrainingConfig, stage: str, lr_scale: float = 1.0) -> DiffusionLMModule:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    cls = PretrainModule if stage == "pretrain" else SFTModule
    module = cls(cfg.model, cfg.diffusion, section.optim, section.schedule, seed=cfg.seed, lr_scale=lr_scale,
                 activation_checkpointing=cfg.activation_checkpointing, nan_check=cfg.nan_check,
                 lora=stage_lora(cfg, stage))
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
        callbacks.append(progress_callback(stage, refresh_rate=max(1, section.log_every_n_steps // 2)))
    return callbacks


def _cluster_plugins(cfg: TrainingConfig) -> list:
    env = cluster_environment(world_size(cfg.accelerator, cfg.devices, cfg.num_nodes), cfg.num_nodes)
    return [env] if env is not None else []


def make_trainer(cfg: TrainingConfig, stage: str, stage_dir: Path, logger, extra_callbacks=()) -> pl.Trainer:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    callbacks = stage_callbacks(cfg, stage, stage_dir / "checkpoints") + list(extra_callbacks)
    accumulate = section.accumulate_grad_batches
    val_every = section.val_every_n_steps
    max_epochs = -1 if stage == "pretrain" else section.epochs
    reapply_logging()  # a sweep imports Lightning after its command configured logging
    precision, precision_plugins = trainer_precision(cfg.precision, stage_lora(cfg, stage))
    return pl.Trainer(
        accelerator=cfg.accelerator, devices=_devices(cfg.devices), num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes, precision=cfg.precision,
                               cpu_offload=cfg.fsdp_cpu_offload),
        # Under SLURM, SLURMEnvironment without Lightning's auto-requeue: SIGUSR1 is GracefulStop's (slurm.py).
        plugins=[AtomicCheckpointIO(), *_cluster_plugins(cfg), *precision_plugins],
        precision=precision, max_steps=section.max_steps, max_epochs=max_epochs, max_time=section.max_time,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=section.optim.grad_clip or None, gradient_clip_algorithm="norm",
        # Validation every `val_every` optimizer steps, counted across epochs (0: only the final one).
        val_check_interval=val_every * accumulate if val_every > 0 else 10**12, check_val_every_n_epoch=None,
        limit_val_batches=section.limit_val_batches or 1.0, num_sanity_val_steps=0,
        log_every_n_steps=section.log_every_n_steps, logger=logger if logger is not None else False,
        callbacks=callbacks, enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False,  # the data modules shard batches over ranks themselves
        default_root_dir=str(stage_dir),
        # Evaluation loops under no_grad, not inference_mode, when sharded: FSDP2 would allocate its gathered
        # parameters as inference tensors (diffusion/packed_inference.py: grad_free_context). Lightning picks
        # no_grad itself only for FSDP1 and for gloo, so CPU runs never showed it; NCCL runs crashed.
        inference_mode=cfg.strategy != "fsdp",
    )
