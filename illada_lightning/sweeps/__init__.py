"""Ablation sweeps and searches: Optuna studies in a real database, every trial an MLflow run nested under
the sweep's parent run. See `sweeps/*.yaml` and `python -m sweeps.run`."""

from .context import SetupContext, TrialContext
from .runner import SweepResult, run_sweep, worker_loop
from .spec import ParamSpec, SweepSpec, load_sweep_spec
from .validate import SweepError, validate_sweep

__all__ = [
    "ParamSpec",
    "SetupContext",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "TrialContext",
    "load_sweep_spec",
    "run_sweep",
    "validate_sweep",
    "worker_loop",
]
