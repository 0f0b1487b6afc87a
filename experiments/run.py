"""Train: `python -m experiments.run [config.yaml] key=value ...`

    python -m experiments.run                                   # tiny: pretrain + SFT + answers, CPU, minutes
    python -m experiments.run stage=pretrain pretrain.max_steps=200
    python -m experiments.run experiments/configs/small_gpu.yaml
    python -m experiments.run stage=sft init_from=runs/default/pretrain name=sft-only
    python -m experiments.run resume=auto                       # continue an interrupted run
    python -m experiments.run strategy=fsdp devices=8 --validate   # check the config, train nothing
    python -m experiments.run --show-config                     # every config key and its value; runs nothing
    python -m experiments.run --multirun pretrain.optim.lr=1e-3,3e-3 stage=pretrain   # one run per value

The config file defaults to experiments/configs/default.yaml; every key of
`illada_lightning.experiment.ExperimentConfig` can be overridden (`--show-config [config.yaml] [key=value ...]`
prints them all, resolved, as YAML).

--multirun: every `key=a,b,...` becomes a dimension of a grid (a comma inside [] or quotes does not split);
each grid point is an ordinary run of this command, tracked in the config's MLflow experiment
(`mlflow.experiment_name`, default illada-lightning) as a trial nested under one sweep parent run. Add
`seed=0,1,2` to repeat each setting, so the comparison has a standard error. `sweep.<field>=...` sets the sweep
(`sweep.name=lr`, `sweep.n_workers=2`, `sweep.objective.metric=val/loss`; see sweeps/README.md). The same
command resumes an interrupted grid; `python -m reports.make --experiment <name>` tabulates it.
All logic lives in `illada_lightning.experiment.run_experiment` and `illada_lightning.sweeps`.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"
UI_PATH = "/#/experiments?workflowType=machine_learning"
UI_URL = "http://127.0.0.1:5000" + UI_PATH


def split_args(argv: list[str]) -> tuple[Path, list[str]]:
    """The optional config path (first argument ending in .yaml/.yml) and the key=value overrides."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        return Path(argv[0]), argv[1:]
    return DEFAULT_CONFIG, argv


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments with resume=auto."""
    kept = [a for a in argv if not a.startswith("resume=")]
    return " ".join(["python -m experiments.run", *(shlex.quote(a) for a in kept), "resume=auto"])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def stage_line(stage: str, summary: dict) -> str:
    """One readable line per stage: `[pretrain] 200 steps in 1 min 5 s (2,310 tokens/s); training loss 8.57 ->
    6.22; validation loss 8.28 -> 6.61; LR switch to cosine decay at step 150`. Every number of the summary,
    as JSON, is in the stage's FINISHED file (`<run_dir>/<stage>/FINISHED`)."""
    if summary.get("skipped"):
        return f"[{stage}] already finished at step {summary.get('global_step')} (resume=auto): not trained again"
    parts = [f"{summary.get('global_step')} steps"]
    if summary.get("wall_time_s") is not None:
        parts[0] += f" in {_duration(summary['wall_time_s'])}"
    if summary.get("tokens_per_s_mean"):
        parts[0] += f" ({summary['tokens_per_s_mean']:,.0f} tokens/s)"
    if summary.get("resumed_from_step"):
        parts[0] += f", resumed from step {summary['resumed_from_step']}"
    first, last = summary.get("first_loss"), summary.get("last_loss")
    if last is not None:
        parts.append(f"training loss {first:.2f} -> {last:.2f}" if first is not None else f"training loss {last:.2f}")
    start, end = summary.get("initial_val_loss"), summary.get("val_loss")
    if end is not None:
        parts.append(f"validation loss {start:.2f} -> {end:.2f}" if start is not None else f"validation loss {end:.2f}")
    if summary.get("lr_switch_step") is not None:
        parts.append(f"LR switch to cosine decay at step {summary['lr_switch_step']}")
    if summary.get("rollbacks"):
        parts.append(f"{summary['rollbacks']} rollback(s) after non-finite values")
    return f"[{stage}] " + "; ".join(parts)


def print_result(result: dict) -> None:
    from illada_lightning.redact import mask_password

    for stage, summary in result["stages"].items():
        print(stage_line(stage, summary))
        if summary.get("summary_covers", "whole run") != "whole run":
            print(f"[{stage}] note: the summary covers {summary['summary_covers']}")
    if result["stages"]:
        files = [str(Path(result["run_dir"]) / stage / "FINISHED") for stage in result["stages"]]
        print(f"stage summaries as JSON: {', '.join(files)}")
    for sample in result.get("samples", []):
        print("-" * 60)
        print(sample["prompt"].rstrip())
        print(f"=> {sample['answer']!r}")
    print("-" * 60)
    print(f"run directory: {result['run_dir']}")
    if "tracking_uri" in result:
        runs = result["mlflow_runs"]
        print(f"MLflow: {mask_password(result['tracking_uri'])} (experiment '{result['mlflow_experiment']}', parent run "
              f"{runs.get('parent')}; child runs " + ", ".join(f"{k}={v}" for k, v in runs.items() if k != "parent") + ")")
        print(f"open the MLflow UI with: {result['ui_command']}")
        # MLflow 3.17 opens on its GenAI pages unless asked for the model-training view (README: MLflow UI).
        base = result["tracking_uri"].rstrip("/") if result["tracking_uri"].startswith("http") else None
        print(f"then browse {mask_password(base) + UI_PATH if base else UI_URL}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if "--show-config" in argv:  # before the logging set-up and torch: a listing answers at once
        from illada_lightning.config import ConfigError, show_config
        from illada_lightning.experiment.config import ExperimentConfig

        config_path, overrides = split_args([a for a in argv if a != "--show-config"])
        try:
            print(show_config(ExperimentConfig, config_path, overrides), end="")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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
    from illada_lightning.training.input_paths import missing_input

    missing = missing_input(cfg)
    if missing:  # answered before the seconds of importing torch
        print(f"error: {missing}", file=sys.stderr)
        return 2
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
