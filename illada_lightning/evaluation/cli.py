"""The evaluation command behind `python -m experiments.evaluate ckpt=... tasks=[...] key=value ...`.

Loads the checkpoint (`checkpoint.load_checkpoint`), evaluates, prints a table, writes
`results.json` (task -> metrics with standard errors) and `eval_config.json` into `out=` (default:
`<checkpoint directory>/eval/`) beside the per-example `<task>.examples.jsonl` files (re-running the same
command resumes from them), and logs `eval/<task>/<metric>` to MLflow in a new run linked to the training
run that produced the checkpoint (nested under its stage's run, found through the run directory's
`mlflow_runs.json`; see `log_to_mlflow`), or a new run tagged with the checkpoint path.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from illada_lightning.config import SHOW_CONFIG, ConfigError, load_config, show_config

from ..budget import budget_note, fit_sampler, trained_context
from ..logs import configure_logging
from ..provenance import git_commit
from ..runs import (
    CHECKPOINT_TAG,
    CONFIG_FILE,
    PARENT_TAG,
    RUNS_FILE,
    eval_metric,
    mark_training_experiment,
    store_of_run_dir,
)
from .config import EvalConfig

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(EvalConfig):
    ckpt: str | None = None  # run directory, stage directory, model.pt or .ckpt (see load_checkpoint)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    mlflow: bool = True
    tracking_uri: str | None = None  # None: the checkpoint's own run store, else MLflow's default
    experiment_name: str = "illada-lightning"

    def validate(self) -> EvaluateConfig:
        super().validate()
        if not self.ckpt:
            raise ValueError("ckpt=PATH is required (a run directory or a checkpoint file)")
        return self


def parse_args(argv: list[str]) -> EvaluateConfig:
    """`key=value` overrides; `config=FILE.yaml` first loads a YAML file."""
    return load_config(EvaluateConfig, *split_args(argv))


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the `config=FILE.yaml` path or None, the other `key=value` overrides)."""
    yaml_path = next((a.split("=", 1)[1] for a in argv if a.startswith("config=")), None)
    return yaml_path, [a for a in argv if not a.startswith("config=")]


def output_dir(cfg: EvaluateConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    ckpt = Path(cfg.ckpt)
    return (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"


def resolve_device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def format_table(results: dict[str, dict[str, float]]) -> str:
    """One row per task: main metric ± standard error, the other metrics, n and seconds."""
    rows = [("task", "metric", "value", "± stderr", "n", "seconds")]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name in ("n", "seconds"):
                continue
            rows.append((task, name, f"{value:.4f}", f"{metrics.get(name + '_stderr', float('nan')):.4f}",
                         f"{int(metrics.get('n', 0))}", f"{metrics.get('seconds', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict, cfg: EvaluateConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "eval_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return path


def find_training_run(ckpt: str | Path) -> tuple[str | None, str | None]:
    """(run id, tracking URI) of the MLflow run that trained `ckpt`; (None, None) if unknown.

    Training (`training/tracking.py`) keeps `{"parent": id, "pretrain": id, "sft": id}` in
    `<run_dir>/mlflow_runs.json` and its config in `<run_dir>/config.yaml`; the store is
    `mlflow.tracking_uri` there, else `sqlite:///<runs_root>/mlflow.db`. The checkpoint's stage (`sft` or
    `pretrain` in its path; else the most trained stage) picks the run."""
    path = Path(ckpt).resolve()
    for run_dir in [path, *path.parents][:5]:
        runs_file = run_dir / RUNS_FILE
        if not runs_file.is_file():
            continue
        runs = json.loads(runs_file.read_text())
        stage = next((s for s in ("sft", "pretrain") if s in path.relative_to(run_dir).parts), None)
        run_id = runs.get(stage) if stage else (runs.get("sft") or runs.get("pretrain"))
        return run_id, training_store(run_dir)
    return None, None


def training_store(run_dir: Path) -> str | None:
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        return None
    from omegaconf import OmegaConf

    config = OmegaConf.load(config_file)
    return store_of_run_dir(run_dir, OmegaConf.select(config, "mlflow.tracking_uri"),
                            OmegaConf.select(config, "runs_root"))


def log_to_mlflow(results: dict, cfg: EvaluateConfig, out: Path) -> str:
    """Log one evaluation run: params (the eval config), `eval/<task>/<metric>`, and the outputs folder as
    artifacts under `eval/`. When the checkpoint's training run is found, the evaluation run is nested under
    it (`mlflow.parentRunId`, in its experiment), so the MLflow UI shows it with the training run while the
    training run's own per-epoch `eval/*` curves stay unmixed; each evaluation (say, one per scoring rule)
    is its own run with its own params. Returns the evaluation run's id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from illada_lightning.config import flatten

    training_run, store = find_training_run(cfg.ckpt)
    uri = cfg.tracking_uri or store
    if uri:
        mlflow.set_tracking_uri(uri)
    tags = {CHECKPOINT_TAG: str(Path(cfg.ckpt).resolve()), "illada.eval.tasks": ",".join(cfg.tasks),
            "mlflow.source.git.commit": git_commit()}
    experiment_id = None
    if training_run is not None:
        try:
            experiment_id = MlflowClient().get_run(training_run).info.experiment_id
            tags[PARENT_TAG] = training_run
        except Exception:  # the store moved or was not found: keep the link as a tag
            log.warning("training run %s not found in %s; the evaluation run is linked by tag only", training_run, uri)
        tags["illada.training_run_id"] = training_run
    if experiment_id is None:
        experiment = mlflow.set_experiment(cfg.experiment_name)
        experiment_id = mark_training_experiment(MlflowClient(), experiment.experiment_id)
    metrics = {eval_metric(task, name): float(v) for task, values in results.items() for name, v in values.items()}
    params = {k: str(v)[:6000] for k, v in flatten(asdict(cfg)).items()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{Path(cfg.ckpt).name}", tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), artifact_path="eval")
        return run.info.run_id


def fit_generation_budget(cfg: EvaluateConfig, context: int) -> None:
    """An answer gets at most half the context the checkpoint was trained on (the prompt keeps the rest, cut
    from the left if longer): a budget beyond it is shortened, steps in proportion, with a note on stderr."""
    room = context // 2
    old = cfg.sampler
    cfg.sampler, what = fit_sampler(old, room)
    if what is not None:
        new = cfg.sampler
        print(budget_note(what, (old.budget, old.steps), (new.budget, new.steps), context,
                          f"; an answer gets at most half of them ({what}=N with N <= {room} picks another)"),
              file=sys.stderr)




def run_evaluation(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    from .tasks import MULTIPLE_CHOICE, get_task

    for name in cfg.tasks:  # a missing data file fails before the model loads
        get_task(name).data_path(cfg)
    if not Path(cfg.ckpt).exists():  # and a missing checkpoint before torch is imported
        raise ValueError(f"checkpoint path does not exist: {cfg.ckpt} (give a run directory or a checkpoint file)")
    from illada_lightning.checkpoint import load_checkpoint

    from .runner import evaluate

    model, tokenizer = load_checkpoint(cfg.ckpt, device=resolve_device(cfg.device))
    if tokenizer is None:
        raise ValueError(f"{cfg.ckpt}: no tokenizer was saved with this checkpoint")
    if any(get_task(name).kind != MULTIPLE_CHOICE for name in cfg.tasks):
        fit_generation_budget(cfg, trained_context(cfg.ckpt, model.config.max_seq_len))
    out = output_dir(cfg)
    results = evaluate(model, tokenizer, cfg.tasks, cfg, out_dir=out, model_id=str(Path(cfg.ckpt).resolve()))
    path = write_results(results, cfg, out)
    print(format_table(results))
    print(f"results: {path}")
    if cfg.mlflow:
        run_id = log_to_mlflow(results, cfg, out)
        print(f"MLflow run: {run_id}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        from .tasks import registered_tasks

        print(__doc__)
        print("registered tasks: " + ", ".join(registered_tasks()))
        print("keys: " + ", ".join(f.name for f in fields(EvaluateConfig)))
        print("every key, nested ones included, with its value: python -m experiments.evaluate --show-config "
              "[key=value ...]")
        return 0
    configure_logging()
    from .records import EvalDataError

    try:
        if SHOW_CONFIG in argv:
            print(show_config(EvaluateConfig, *split_args([a for a in argv if a != SHOW_CONFIG])), end="")
            return 0
        cfg = parse_args(argv)  # before torch is imported: a typo is answered at once
        run_evaluation(cfg)
    # ValueError covers CheckpointError and the settings checks of the runner and sampler.
    except (ConfigError, EvalDataError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("ILLADA_TRACEBACK"):  # debugging: the full traceback instead of one line
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
