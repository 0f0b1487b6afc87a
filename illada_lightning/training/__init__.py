"""Training: pretraining and SFT on one LightningModule, the iLLaDA LR schedules, MLflow, resume.

Entry point: `experiment.run_experiment(cfg)` (what `python -m experiments.run` calls). Heavier modules are
not imported here, so `import illada_lightning.training.config` stays cheap.

    config.py      ExperimentConfig and its groups (optim, schedule, pretrain, sft, mlflow, preview)
    schedule.py    the LR schedules as pure functions + the RecipeLR scheduler (switch step in its state)
    plateau.py     the smoothed-loss plateau detector (pure)
    callbacks.py   LossPlateauLRSwitch, NonFiniteLossGuard, ThroughputMonitor
    module.py      DiffusionLMModule, PretrainModule, SFTModule
    strategy.py    auto | ddp | fsdp
    tracking.py    MLflow parent run + nested stage runs
    checkpoint.py  load_checkpoint, export, init_from checks
    experiment.py  preflight checks, stages, resume, generated answers
"""
