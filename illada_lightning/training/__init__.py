"""Training: pretraining and SFT on one LightningModule, the iLLaDA LR schedules, MLflow, resume.

Entry point: `experiment.run_training(cfg)` (`illada_lightning.experiment.run_experiment` adds evaluation). Heavier modules are
not imported here, so `import illada_lightning.training.config` stays cheap.

    config.py      TrainingConfig and its groups (optim, schedule, pretrain, sft, mlflow, preview)
    schedule.py    the LR schedules as pure functions + the RecipeLR scheduler (switch step in its state)
    plateau.py     the smoothed-loss plateau detector (pure)
    callbacks.py   LossPlateauLRSwitch, NonFiniteLossGuard (loss, gradients, weights), ThroughputMonitor
    finite.py      "are the weights / gradients finite?", agreed by every rank
    module.py      DiffusionLMModule, PretrainModule, SFTModule
    strategy.py    auto | ddp | fsdp
    tracking.py    MLflow parent run + nested stage runs, truthful statuses, store checks
    step_checkpoint.py   StepCheckpoint (finite weights only, atomic, newest ckpt_keep kept)
    interrupt.py   GracefulStop: SIGTERM / SIGINT / SLURM's signal save the current step and stop
    slurm.py       under SLURM: the cluster environment, who owns SIGUSR1, the requeue (`scontrol requeue`)
    run_record.py  first losses, initial validation, wall time carried across resumes
    preflight.py   every check before training (run dir, store, init_from, tokenizer, data)
    trainer_factory.py   the module and Trainer of a stage
    stage.py       one stage: resume, fit with rollback, final checkpoint, export, MLflow
    preview.py     generated answers after SFT
    experiment.py  run_training: preflight, the stages, run statuses on every way out

Checkpoint files (atomic writes, the resume scan, exports) live one layer down in `illada_lightning/checkpoint/`;
the per-epoch evaluation is attached one layer up, in `illada_lightning/experiment.py`.
"""
