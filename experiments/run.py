"""Train: `python -m experiments.run [config.yaml] key=value ...`

    python -m experiments.run                                   # tiny: pretrain + SFT + answers, CPU, minutes
    python -m experiments.run stage=pretrain pretrain.max_steps=200
    python -m experiments.run experiments/configs/small_gpu.yaml
    python -m experiments.run stage=sft init_from=runs/default/pretrain name=sft-only
    python -m experiments.run resume=auto                       # continue an interrupted run
    python -m experiments.run strategy=fsdp devices=8 --validate   # check the config, train nothing

The config file defaults to experiments/configs/default.yaml; every key of
`illada_lightning.experiment.ExperimentConfig` can be overridden. All logic lives in
`illada_lightning.training.experiment.run_experiment`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
UI_URL = "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"


def split_args(argv: list[str]) -> tuple[Path, list[str]]:
    """The optional config path (first argument ending in .yaml/.yml) and the key=value overrides."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        return Path(argv[0]), argv[1:]
    return DEFAULT_CONFIG, argv


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with resume=auto."""
    kept = [a for a in argv if not a.startswith("resume=")]
    return " ".join(["python -m experiments.run", *(shlex.quote(a) for a in kept), "resume=auto"])


def print_result(result: dict) -> None:
    for stage, summary in result["stages"].items():
        keys = ("global_step", "first_loss", "last_loss", "initial_val_loss", "val_loss", "tokens_per_s_mean", "wall_time_s",
                "lr_switch_step", "resumed_from_step", "skipped")
        shown = {k: summary.get(k) for k in keys if summary.get(k) is not None}
        print(f"[{stage}] " + json.dumps(shown, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
        if summary.get("summary_covers", "whole run") != "whole run":
            print(f"[{stage}] note: the summary covers {summary['summary_covers']}")
    for sample in result.get("samples", []):
        print("-" * 60)
        print(sample["prompt"].rstrip())
        print(f"=> {sample['answer']!r}")
    print("-" * 60)
    print(f"run directory: {result['run_dir']}")
    if "tracking_uri" in result:
        runs = result["mlflow_runs"]
        print(f"MLflow: {result['tracking_uri']} (experiment '{result['mlflow_experiment']}', parent run "
              f"{runs.get('parent')}; child runs " + ", ".join(f"{k}={v}" for k, v in runs.items() if k != "parent") + ")")
        print(f"open the MLflow UI with: {result['ui_command']}")
        # MLflow 3.17 opens on its GenAI pages unless asked for the model-training view (README: MLflow UI).
        print(f"then browse {UI_URL}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from illada_lightning.logs import configure_logging

    configure_logging()
    if "--multirun" in argv:  # comma lists become a grid sweep (same machinery as `python -m sweeps.run`)
        from illada_lightning.sweeps.multirun import multirun_main

        return multirun_main(argv)
    # Parse and validate before importing torch / Lightning / MLflow: a typo is answered in a second.
    from illada_lightning.config import ConfigError, load_config
    from illada_lightning.experiment.config import ExperimentConfig

    validate_only = "--validate" in argv
    config_path, overrides = split_args([a for a in argv if a != "--validate"])
    try:
        cfg = load_config(ExperimentConfig, config_path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if validate_only:  # what a launch script runs as a dry run: the command parses, nothing trains
        print(f"config is valid: stage={cfg.stage} strategy={cfg.strategy} devices={cfg.devices} "
              f"num_nodes={cfg.num_nodes} resume={cfg.resume} run_dir={cfg.resolved_run_dir}")
        return 0
    from illada_lightning.experiment.run import run_experiment
    from illada_lightning.training.experiment import TrainingInterrupted, is_rank_zero

    configure_logging()  # again: importing Lightning installed its own handler
    try:
        result = run_experiment(cfg)
    except TrainingInterrupted as exc:  # a stop signal: checkpoint saved, MLflow runs KILLED
        if is_rank_zero():
            print(f"error: {exc}", file=sys.stderr)
            if exc.requeue:  # SLURM's time-limit signal: the job was requeued (or the requeue failed)
                print(exc.requeue, file=sys.stderr)
            print(f"resume with: {resume_command(argv)}", file=sys.stderr)
        return exc.exit_code  # non-zero, so a scheduler does not record success
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        if os.environ.get("ILLADA_TRACEBACK"):  # debugging: the full traceback instead of one line
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_rank_zero():
        print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
