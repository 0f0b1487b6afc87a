"""The whole experiment: training (`training/`) with the per-epoch evaluation (`evaluation/`) attached.

The one layer that knows both. `config.py`: `ExperimentConfig`, the training config plus the `eval` group (no
torch import, so the CLIs check a command line in a second); `run.py`: `run_experiment`, which runs the stages
with `PerEpochEvaluation` added to SFT when `eval.per_epoch=true` (the SFT-epoch curve of iLLaDA Fig. 1).
Import from the submodules: this file imports nothing, so loading the config never loads torch.
"""
