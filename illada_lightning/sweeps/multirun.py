"""Hydra-like `--multirun`: `python -m experiments.run --multirun sft.epochs=1,2,4 eval.scoring_rule=a,b`.

Every `key=v1,v2,...` (a comma outside brackets and quotes) becomes a categorical grid dimension; every other
`key=value` is a base override; `sweep.<field>=...` sets a field of the SweepSpec (name, mode, n_workers,
storage, objective.metric, ...). `config=FILE.yaml` (or `--config FILE.yaml`) names the experiment YAML. The
result runs through `run_sweep`, so storage, MLflow nesting and resume are those of a YAML sweep. Without
`sweep.name` the name is derived from the command line, so the same command resumes the same study.

Each grid point is an ordinary run of `experiments.run`, so it is tracked where that command's config says
(`follow_experiment_config`): in its MLflow experiment (`mlflow.experiment_name`, default illada-lightning,
where the main job's runs are), its store and its runs root, as trials nested under one sweep parent run. A
YAML sweep keeps an experiment of its own, named after the sweep.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, load_config, to_yaml
from ..runs import DEFAULT_RUNS_ROOT, SWEEPS_DIR, default_tracking_uri, ui_command
from .runner import SweepResult, run_sweep
from .spec import ParamSpec, SweepSpec
from .targets import TargetError, experiment_target
from .validate import SweepError


def split_top_level(value: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside [], {}, () and quotes: `a,b` → [a, b]; `[a,b]` stays one value."""
    parts, depth, quote, current = [], 0, None, []
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_scalar(text: str) -> Any:
    """`4` → 4, `1e-3` → 0.001, `true` → True, `'a,b'` → 'a,b', `off` → 'off', anything else → the string.

    Only `true`/`false` are booleans (YAML 1.2's rule, as `config.load_config` reads untyped values): `off`,
    `on`, `yes`, `no` stay words, so `sampler.parallel=off,threshold` sweeps two modes; a boolean option reads
    the word itself."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def parse_multirun(argv_overrides: list[str]) -> SweepSpec:
    """Build the SweepSpec a `--multirun` command line describes (validation happens in run_sweep)."""
    sweep_overrides: list[str] = []
    base: list[str] = []
    space: dict[str, ParamSpec] = {}
    experiment = None
    args = [a for a in argv_overrides if a != "--multirun"]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            experiment, i = args[i + 1], i + 2
            continue
        i += 1
        if "=" not in arg and arg.endswith((".yaml", ".yml")):  # experiments.run's positional config file
            experiment = arg
            continue
        if "=" not in arg:
            raise ValueError(f"multirun argument {arg!r} is not of the form key=value or key=v1,v2")
        key, value = arg.split("=", 1)
        if key == "config":
            experiment = value
        elif key.startswith("sweep."):
            sweep_overrides.append(f"{key[len('sweep.'):]}={value}")
        else:
            values = split_top_level(value)
            if len(values) > 1:
                space[key] = ParamSpec(type="categorical", choices=[parse_scalar(v) for v in values])
            else:
                base.append(arg)
    if not space:
        raise ValueError("--multirun needs at least one key with a comma-separated list of values (key=a,b)")
    digest = hashlib.sha1(repr((experiment, base, sorted((k, p.choices) for k, p in space.items()))).encode())
    spec = SweepSpec(name=f"multirun-{digest.hexdigest()[:8]}", experiment=experiment, overrides=base, space=space)
    # Through load_config, so `sweep.*` overrides get the same typed checks and errors as a sweep YAML.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "multirun.yaml"
        path.write_text(to_yaml(spec))
        return follow_experiment_config(load_config(SweepSpec, path, sweep_overrides))


def follow_experiment_config(spec: SweepSpec) -> SweepSpec:
    """Track the grid where `experiments.run` with the same config tracks a run: its `mlflow.experiment_name`,
    `mlflow.tracking_uri` and `runs_root` (the study under `<runs_root>/sweeps/<name>/`), unless `sweep.*`
    overrides name them."""
    try:
        cfg = experiment_target(spec).load()
    except (ConfigError, TargetError, ValueError):
        return spec  # run_sweep's validation names the problem
    mlflow = getattr(cfg, "mlflow", None)
    if spec.mlflow_experiment is None and getattr(mlflow, "experiment_name", None):
        spec.mlflow_experiment = mlflow.experiment_name
    if spec.tracking_uri is None and getattr(mlflow, "tracking_uri", None):
        spec.tracking_uri = mlflow.tracking_uri
    runs_root = getattr(cfg, "runs_root", None)
    if runs_root and Path(runs_root).resolve() != Path(DEFAULT_RUNS_ROOT).resolve():
        spec.output_dir = spec.output_dir or str(Path(runs_root) / SWEEPS_DIR / spec.name)
        spec.tracking_uri = spec.tracking_uri or default_tracking_uri(runs_root)
    return spec


def launch_multirun(argv_overrides: list[str]) -> SweepResult:
    """Expand comma lists into a grid sweep and run it (what `experiments.run --multirun` calls)."""
    spec = parse_multirun(argv_overrides)
    result = run_sweep(spec)
    print(result_text(result, spec))
    return result


def multirun_main(argv: list[str]) -> int:
    """`experiments.run --multirun ...`: run the grid, print the outcome; exit code 2 on bad input, 1 when
    trials are still pending (interrupted), else 0."""
    try:
        result = launch_multirun(argv)
    except (ConfigError, SweepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.n_pending == 0 else 1


def report_command(result: SweepResult, spec: SweepSpec) -> str:
    """The `reports.make` command that tabulates this sweep: its MLflow experiment when the sweep shares one with
    plain runs (a multirun), else the sweep itself; `--tracking-uri` only for a store other than the default."""
    uri = "" if result.tracking_uri == default_tracking_uri(DEFAULT_RUNS_ROOT) else f" --tracking-uri {result.tracking_uri}"
    if result.mlflow_experiment and result.mlflow_experiment != spec.name:
        return (f"python -m reports.make --experiment {result.mlflow_experiment}{uri}   "
                f"(this grid alone: --sweep {spec.name})")
    return f"python -m reports.make --sweep {spec.name}{uri}"


def result_text(result: SweepResult, spec: SweepSpec) -> str:
    """`format_result` with the report's verdict on the finished trials (read back from MLflow)."""
    from ..reporting.verdict import sweep_verdict  # MLflow: only once a sweep has run

    verdict = sweep_verdict(result.tracking_uri, result.parent_run_id) if result.n_complete else None
    return format_result(result, verdict, report_command(result, spec))


def format_result(result: SweepResult, verdict: str | None = None, report: str | None = None) -> str:
    lines = [
        f"sweep study '{result.study_name}': {result.n_complete} complete, {result.n_failed} failed, "
        f"{result.n_pruned} pruned, {result.n_pending} pending",
        f"  Optuna storage: {result.storage}",
        f"  MLflow: experiment '{result.mlflow_experiment}', parent run {result.parent_run_id} "
        f"(UI: {ui_command(result.tracking_uri)})",
    ]
    if verdict:
        lines.append(f"  {verdict}")
    elif result.best_params is not None:
        lines.append(f"  best `{result.objective}`: {result.best_value:.6g} at {result.best_params} "
                     "(not weighed against the noise: see the report)")
    for number, error in result.errors[:3]:
        lines.append(f"  trial {number} failed: {error.splitlines()[0]}")
    if report:
        lines.append(f"  report: {report}")
    return "\n".join(lines)
