"""Run conventions, in one place: the run-directory layout, MLflow tag and metric names, the default store.

Everything that writes or reads a run (training, evaluation, sweeps, reports) imports its names from here, so a
rename happens once. No heavy imports: the CLIs read this before torch, Lightning or MLflow load.

    <runs_root>/mlflow.db                  default MLflow store (`sqlite:///<runs_root>/mlflow.db`)
    <runs_root>/mlartifacts/               its artifacts
    <run_dir>/config.yaml                  the resolved experiment config
    <run_dir>/mlflow_runs.json             {"parent": id, "pretrain": id, "sft": id}: resume logs into the same runs
    <runs_root>/sweeps/<name>/optuna.db    a sweep's Optuna study; trial k trains under trial_<k:04d>/
"""

from __future__ import annotations

from pathlib import Path

from .redact import mask_password as _mask

# Layout ------------------------------------------------------------------------------------------------------------
DEFAULT_RUNS_ROOT = "runs"
CONFIG_FILE = "config.yaml"
RUNS_FILE = "mlflow_runs.json"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
SWEEPS_DIR = "sweeps"
OPTUNA_FILE = "optuna.db"

# Tags --------------------------------------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests by (the tag `start_run(nested=True)` writes)
COMMIT_TAGS = ("git_commit", "mlflow.source.git.commit")
STAGE_TAG = "illada.stage"  # pretrain | sft
ATTEMPT_TAG = "illada.attempt"  # 1, 2, ...: one child run per attempt at a stage (a resume is a new attempt)
PREVIOUS_ATTEMPT_TAG = "illada.previous_attempt"  # the run id of the attempt this one resumed
CHECKPOINT_TAG = "illada.checkpoint"
REQUEUED_TAG = "illada.requeued"  # on the runs of an attempt stopped by SLURM's time-limit signal and requeued
SLURM_JOB_TAG = "slurm.job_id"  # the SLURM job (`<array job>_<task>` for an array task) a run was made in
SLURM_RESTART_TAG = "slurm.restart_count"  # SLURM_RESTART_COUNT: 0 at the first start, n after n requeues
ROLE_TAG = "sweep.role"  # parent | trial | base (the one training an eval_only / per_epoch sweep reuses)
SWEEP_NAME_TAG = "sweep.name"
SWEEP_STUDY_TAG = "sweep.study"
TRIAL_NUMBER_TAG = "sweep.trial_number"
SWEEP_PARAM_PREFIX = "sweep.param."  # sweep.param.<config key> = the trial's value
SWEEP_ERROR_TAG = "sweep.error"
SWEEP_STATE_TAG = "sweep.state"  # the Optuna state: COMPLETE | PRUNED | FAIL

# Metrics -----------------------------------------------------------------------------------------------------------
# Logged by the training LightningModules and callbacks (training/module.py, training/callbacks.py), every
# `log_every_n_steps` optimizer steps unless said otherwise.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
TOKENS_PER_S = "train/tokens_per_s"
TOKENS_SEEN = "train/tokens_seen"  # non-padding tokens trained on, all ranks: the x axis to compare runs by
MFU = "train/mfu"  # model FLOPs/s over the measured bf16 GEMM rate (GPU only; a fraction, 0-1)
MAX_MEMORY_GIB = "train/max_memory_gib"  # peak GPU memory allocated by torch in the interval (GPU only)
# The 1/t-weighted loss (iLLaDA Eq. 1) of the rows whose mask ratio t falls in each fifth of [0, 1], averaged
# over the rows of the log interval: how the loss depends on the noise level.
MASK_RATIO_BINS = 5
LOSS_BY_MASK_RATIO = tuple(f"train/loss_t{100 * k // MASK_RATIO_BINS}_{100 * (k + 1) // MASK_RATIO_BINS}"
                           for k in range(MASK_RATIO_BINS))
# The plateau LR switch (pretraining), logged once at the step it happens, and tagged on the stage's run.
LR_SWITCH_STEP = "train/lr_switch_step"
LR_SWITCH_LOSS = "train/lr_switch_loss"  # the smoothed training loss at the switch
TRAINING_METRICS = frozenset({
    TRAIN_LOSS, "train/masked_fraction", "train/grad_norm", "train/lr", TOKENS_PER_S,
    "train/steps_per_s", TOKENS_SEEN, VAL_LOSS, MFU, MAX_MEMORY_GIB, *LOSS_BY_MASK_RATIO, LR_SWITCH_STEP,
    LR_SWITCH_LOSS,
})
LR_SWITCH_TAG = "illada.lr_switch_step"
LR_SWITCH_LOSS_TAG = "illada.lr_switch_loss"
# Param of every stage run on a GPU: the bf16 GEMM rate measured at start-up, the denominator of `train/mfu`.
GEMM_TFLOPS_PARAM = "perf.gemm_tflops"
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's system metrics (GPU utilisation and memory, CPU, disk)
# What an evaluation task reports, logged as `eval/<task>/<name>` (evaluation/metrics.py).
EVAL_METRIC_NAMES = frozenset({
    "acc", "acc_norm", "accuracy", "exact_match", "em", "f1", "acc_stderr", "acc_norm_stderr",
    "exact_match_stderr", "n", "seconds",
})


def eval_metric(task: str, name: str) -> str:
    return f"eval/{task}/{name}"


# Store -------------------------------------------------------------------------------------------------------------
def sqlite_path(uri: str) -> Path | None:
    """The file behind a `sqlite:///...` URI (None for servers and in-memory SQLite)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return Path(path).expanduser() if path and path != ":memory:" else None


def server_unreachable(uri: str, timeout_s: float = 10.0) -> str | None:
    """Why an http(s) tracking server cannot be reached (None when it accepts connections, or `uri` is no
    server): checked with one connection, not MLflow's client, which retries for minutes."""
    if not uri.startswith(("http://", "https://")):
        return None
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    import socket

    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def ui_command(uri: str) -> str:
    """How to look at the runs: the `mlflow ui` command for a local store; a server serves its UI itself."""
    if uri.startswith(("http://", "https://")):
        return f"{_mask(uri)} (served by the tracking server)"
    return f"mlflow ui --backend-store-uri {uri}"


def default_tracking_uri(runs_root: str | Path = DEFAULT_RUNS_ROOT) -> str:
    """`sqlite:///<runs_root>/mlflow.db`: MLflow 3's recommended backend (the file store is deprecated)."""
    return f"sqlite:///{Path(runs_root).expanduser().resolve() / STORE_FILE}"


def artifact_location(tracking_uri: str | None, runs_root: str | Path = DEFAULT_RUNS_ROOT) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite store (never `./mlruns` of the working
    directory); a server decides for itself (None)."""
    if not tracking_uri:
        return (Path(runs_root).expanduser().resolve() / ARTIFACTS_DIR).as_uri()
    path = sqlite_path(tracking_uri)
    return (path.resolve().parent / ARTIFACTS_DIR).as_uri() if path is not None else None


def store_of_run_dir(run_dir: Path, configured_uri: str | None, runs_root: str | Path | None) -> str | None:
    """The store a finished run logged to: its configured URI, else the default store of its runs root (or of
    the run directory's parent), when that file exists."""
    if configured_uri:
        return str(configured_uri)
    roots = [Path(runs_root).resolve()] if runs_root else []
    for root in [*roots, run_dir.parent]:
        if (root / STORE_FILE).is_file():
            return f"sqlite:///{root / STORE_FILE}"
    return None


# The MLflow experiment kind of every experiment this project creates (training, sweeps, evaluations,
# reports): MLflow 3's UI opens an experiment on its GenAI pages (traces, "Detect Issues", an assistant panel)
# unless `mlflow.experimentKind` says it holds model training. No MLflow import: callers pass their client.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}


def mark_training_experiment(client, experiment_id: str) -> str:
    """Tag the experiment (new or found, so stores made by older versions get it too); returns its id."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment_id
