"""The built-in trials: each one runs the library entry points of `python -m experiments.run`
(`experiment.run_experiment`) and `python -m experiments.evaluate` (`evaluation.cli.run_evaluation`),
so a trial is an ordinary experiment run — there is no second training or evaluation loop here.

MLflow nesting: the trial's run (created by the sweep runner, nested under the sweep's parent) *is* the
experiment's parent run — it is written into `<run_dir>/mlflow_runs.json` before training, so the training
code's tracker logs the config there and hangs its pretrain/SFT stage runs under it:

    sweep-<name>  (parent)
    └── <name>-trial-3  (trial: params, final metrics)      = the experiment's parent run
        ├── <name>-trial-3/pretrain
        └── <name>-trial-3/sft
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import optuna

from ..config import flatten, to_dict
from ..runs import CHECKPOINT_TAG, RUNS_FILE
from .context import SetupContext, TrialContext
from .space import param_values
from .spec import SweepSpec
from .targets import (
    EVAL_PREFIX,
    eval_target,
    experiment_eval_fields,
    experiment_target,
    split_overrides,
    uses_evaluation,
)
from .tracking import close_running, log_params, nest_under, set_tags, stage_runs

log = logging.getLogger(__name__)


# Training -------------------------------------------------------------------------------------------------------
def _experiment_config(spec: SweepSpec, extra: list[str], run_dir: Path, run_name: str, tracking_uri: str):
    target = experiment_target(spec)
    bookkeeping = [f"run_dir={run_dir}", f"name={run_name}", f"mlflow.tracking_uri={tracking_uri}",
                   f"mlflow.experiment_name={spec.resolved_mlflow_experiment}"]
    return target.load([*extra, *bookkeeping])


def _train(cfg, run_dir: Path, run_id: str, client, extra_callbacks=(), *, spec: SweepSpec, trial=None) -> dict:
    """`run_experiment(cfg)` logging into `run_id` as its parent run; stage runs are closed on failure.

    In this process, with the pruning callback when `trial` is given; a config asking for several devices or
    nodes runs as a process group of its own instead (`process_group.py`), reporting to `trial` itself."""
    from ..experiment.run import run_experiment
    from .process_group import (
        TrialProcessError,
        check_finished_in_mlflow,
        needs_process_group,
        run_in_process_group,
    )
    from .pruning import OptunaPruningCallback

    run_dir.mkdir(parents=True, exist_ok=True)
    runs_file = run_dir / RUNS_FILE
    if not runs_file.is_file():
        runs_file.write_text(json.dumps({"parent": run_id}, indent=2) + "\n")
    log_params(client, run_id, flatten(to_dict(cfg)))
    sharded = needs_process_group(cfg)
    if sharded and extra_callbacks:
        raise TrialProcessError("this sweep attaches callbacks to training in the worker (a custom schema's "
                                "per-epoch evaluation), which a trial running as a process group cannot take")
    try:
        if sharded:
            result = run_in_process_group(cfg, spec, run_dir, trial)
            check_finished_in_mlflow(client, result)
        else:
            pruning = [OptunaPruningCallback(trial, spec.pruner.monitor)] if trial is not None else []
            result = run_experiment(cfg, extra_callbacks=[*extra_callbacks, *pruning], preview=False)
    except BaseException as exc:
        stages = [r for r in stage_runs(run_dir) if r != run_id]
        close_running(client, stages, "KILLED" if not isinstance(exc, Exception) or _is_pruned(exc) else "FAILED")
        raise
    # Whatever the tracker decided, its runs end up below the trial run.
    runs = result.get("mlflow_runs", {})
    nest_under(client, [runs.get("parent", "")], run_id, {})
    client.update_run(run_id, status="RUNNING")  # the tracker closed "its" parent; the sweep closes it
    return result


def _is_pruned(exc: BaseException) -> bool:
    return isinstance(exc, optuna.TrialPruned)


def training_metrics(result: dict) -> dict[str, float]:
    """`val/loss` and `train/loss` of the last stage (what a search on training metrics optimises)."""
    stages = result.get("stages", {})
    if not stages:
        return {}
    last = stages[list(stages)[-1]]
    out = {}
    if last.get("val_loss") is not None:
        out["val/loss"] = float(last["val_loss"])
    if last.get("last_loss") is not None:
        out["train/loss"] = float(last["last_loss"])
    return out


def final_checkpoint(result: dict) -> str:
    stages = result["stages"]
    last = stages["sft"] if "sft" in stages else stages[list(stages)[-1]]
    return last.get("export") or last["checkpoint"]


# Evaluation -----------------------------------------------------------------------------------------------------
def _evaluate(spec: SweepSpec, checkpoint: str, eval_overrides: list[str], out_dir: Path, run_id: str, client):
    """`run_evaluation` of `experiments.evaluate`, its metrics logged into the trial run (not the checkpoint's
    training run, which every trial of an eval_only sweep shares)."""
    from ..evaluation.cli import run_evaluation

    cfg = eval_target(spec, checkpoint).load([*eval_overrides, f"out={out_dir / 'eval'}", "mlflow=false"])
    log_params(client, run_id, {f"eval.{k}": v for k, v in flatten(dataclasses.asdict(cfg)).items()})
    set_tags(client, run_id, {CHECKPOINT_TAG: str(Path(checkpoint).resolve())})
    results = run_evaluation(cfg)
    return {f"eval/{task}/{name}": float(v) for task, values in results.items() for name, v in values.items()
            if isinstance(v, (int, float))}


# The three modes ------------------------------------------------------------------------------------------------
def training_key(cfg) -> str:
    """What determines the trained weights: the config without run naming and, unless the per-epoch
    evaluation runs during training, without the `eval` group (evaluation settings do not change training)."""
    flat = flatten(to_dict(cfg))
    per_epoch = bool(flat.get("eval.per_epoch", False))
    kept = {k: v for k, v in flat.items()
            if k not in ("run_dir", "name") and (per_epoch or not k.startswith(EVAL_PREFIX))}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _reusable_training(ctx: TrialContext, train_key: str) -> dict | None:
    """A finished trial of this study that trained exactly the same experiment config (it differed only in
    evaluation settings): its checkpoint and training metrics, so this trial only evaluates."""
    for t in ctx.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        info = t.user_attrs.get("training")
        if info and info.get("key") == train_key and Path(info["checkpoint"]).exists():
            return {**info, "trial": t.number}
    return None


def train_trial(ctx: TrialContext) -> dict[str, float]:
    """mode train: train with the trial's overrides; then evaluate if the sweep has evaluation settings.

    Grid points that differ only in `eval.*` keys (e.g. `--multirun sft.epochs=1,2 eval.scoring_rule=a,b`)
    train once: a later point reuses the finished trial's checkpoint and only evaluates.
    """
    exp_overrides, eval_overrides = split_overrides(ctx.spec, ctx.params)
    cfg = _experiment_config(ctx.spec, exp_overrides, ctx.output_dir, f"{ctx.spec.name}-trial-{ctx.number}",
                             ctx.tracking_uri)
    train_key = training_key(cfg)
    reused = _reusable_training(ctx, train_key) if ctx.spec.pruner.type == "none" else None
    if reused is not None:
        set_tags(ctx.client, ctx.run_id, {"sweep.reused_training_of_trial": reused["trial"],
                                          CHECKPOINT_TAG: reused["checkpoint"]})
        log_params(ctx.client, ctx.run_id, flatten(to_dict(cfg)))
        metrics, checkpoint = dict(reused["metrics"]), reused["checkpoint"]
    else:
        trial = ctx.trial if ctx.spec.pruner.type != "none" else None
        result = _train(cfg, ctx.output_dir, ctx.run_id, ctx.client, spec=ctx.spec, trial=trial)
        metrics, checkpoint = training_metrics(result), final_checkpoint(result)
    ctx.trial.set_user_attr("training", {"key": train_key, "checkpoint": str(Path(checkpoint).resolve()),
                                         "metrics": metrics})
    if uses_evaluation(ctx.spec):
        metrics.update(_evaluate(ctx.spec, checkpoint, eval_overrides, ctx.output_dir, ctx.run_id, ctx.client))
    return metrics


def setup_shared_checkpoint(ctx: SetupContext) -> dict[str, Any]:
    """eval_only: the checkpoint every trial evaluates — `checkpoint:` of the sweep, else trained once here."""
    if ctx.spec.checkpoint:
        if not Path(ctx.spec.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {ctx.spec.checkpoint} does not exist")
        set_tags(ctx.client, ctx.run_id, {CHECKPOINT_TAG: ctx.spec.checkpoint})
        return {"checkpoint": str(Path(ctx.spec.checkpoint).resolve())}
    cfg = _experiment_config(ctx.spec, [], ctx.output_dir, f"{ctx.spec.name}-base", ctx.tracking_uri)
    result = _train(cfg, ctx.output_dir, ctx.run_id, ctx.client, spec=ctx.spec)
    return {"checkpoint": str(Path(final_checkpoint(result)).resolve()), "base_run_id": ctx.run_id}


def eval_only_trial(ctx: TrialContext) -> dict[str, float]:
    """mode eval_only: evaluate the shared checkpoint with the trial's evaluation settings."""
    _, eval_overrides = split_overrides(ctx.spec, ctx.params)
    return _evaluate(ctx.spec, ctx.setup["checkpoint"], eval_overrides, ctx.output_dir, ctx.run_id, ctx.client)


eval_only_trial.setup = setup_shared_checkpoint


def setup_per_epoch(ctx: SetupContext) -> dict[str, Any]:
    """per_epoch: one SFT run for the largest epoch count, evaluated after every epoch by the evaluation
    callback (`eval/<task>/<metric>` at step = epoch in the SFT stage run), instead of N training runs."""
    from ..evaluation.callback import PerEpochEvaluation
    from ..evaluation.config import EvalConfig
    (key, param), = ctx.spec.space.items()
    epochs = max(int(v) for v in param_values(param))
    full = eval_target(ctx.spec).load()  # validated evaluation settings
    fields = experiment_eval_fields(ctx.spec)
    if fields:
        # The experiment attaches the callback to SFT itself (`eval.per_epoch=true`); hand it our settings
        # (those its `eval` group has: `device`, `ckpt`, ... belong to the evaluation CLI only).
        extra = [f"{EVAL_PREFIX}{o}" for o in [*ctx.spec.evaluation.overrides, *ctx.spec.evaluation.task_overrides()]
                 if o.split("=", 1)[0].split(".", 1)[0] in fields]  # nested keys too: sampler.steps=...
        extra.append("eval.per_epoch=true")
        callbacks = []
    else:
        eval_cfg = EvalConfig(**{f.name: getattr(full, f.name) for f in dataclasses.fields(EvalConfig)})
        extra, callbacks = [], [PerEpochEvaluation(eval_cfg)]
    cfg = _experiment_config(ctx.spec, [*extra, f"{key}={epochs}"], ctx.output_dir, f"{ctx.spec.name}-base",
                             ctx.tracking_uri)
    result = _train(cfg, ctx.output_dir, ctx.run_id, ctx.client, callbacks, spec=ctx.spec)
    runs = result.get("mlflow_runs", {})
    return {"history_run_id": runs.get("sft") or ctx.run_id, "base_run_id": ctx.run_id,
            "checkpoint": str(Path(final_checkpoint(result)).resolve()), "epochs": epochs}


def per_epoch_trial(ctx: TrialContext) -> dict[str, float]:
    """per_epoch: this trial's epoch, read from the per-epoch evaluation history of the one training run."""
    (epoch,) = ctx.params.values()
    run_id = ctx.setup["history_run_id"]
    run = ctx.client.get_run(run_id)
    metrics = {}
    for key in run.data.metrics:
        if key.startswith("eval/"):
            values = {m.step: m.value for m in ctx.client.get_metric_history(run_id, key)}
            if int(epoch) in values:
                metrics[key] = float(values[int(epoch)])
    if not metrics:
        raise ValueError(f"run {run_id} logged no eval/<task>/<metric> at epoch {epoch} "
                         "(is the per-epoch evaluation callback's every_n_epochs a divisor of it?)")
    set_tags(ctx.client, ctx.run_id, {"sweep.history_run_id": run_id})
    return metrics


per_epoch_trial.setup = setup_per_epoch
