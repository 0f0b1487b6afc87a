"""A trial that is a distributed job (several devices or nodes) runs as its own process group.

An in-process trial cannot be one: Lightning's launcher would re-execute the *sweep* command as rank 1, whose
child is then terminated and the trial left RUNNING, the command hanging. So the worker:
1. writes the trial's resolved experiment config to `<trial dir>/trial_config.yaml` (readable by its owner only);
2. launches `python -m illada_lightning.sweeps.trial_process <that file>` on every rank, through `torchrun
   --standalone --nproc-per-node=<devices>` on one node, or `srun --nodes=<num_nodes> --ntasks-per-node=<devices>`
   inside a SLURM allocation when the trial spans nodes (`SweepSpec.trial_launcher`);
3. waits (Optuna's heartbeat thread keeps beating for the trial meanwhile). Rank 0 of the group reports the
   pruning monitor to the same Optuna trial through the storage (`trial_process.py`), and all ranks stop
   together when it says prune;
4. reads the result: the stage summaries rank 0 wrote (`trial_result.json`: what `run_experiment` returned),
   checked against MLflow, where every stage run of the trial must have ended FINISHED.
A group that exits non-zero (a dead rank: torchrun then stops the others) makes the trial FAIL with the
launcher's exit code and the tail of its log (`<trial dir>/trial_process.log`); it never hangs. If the worker
itself dies, the group gets SIGTERM (Linux parent-death signal), stops at a checkpoint and closes its MLflow
runs KILLED; Optuna's heartbeat then fails the trial and another worker retries it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..config import to_yaml
from ..training.strategy import StrategyError, world_size
from .spec import SweepSpec

CONFIG_FILE, RESULT_FILE, LOG_FILE = "trial_config.yaml", "trial_result.json", "trial_process.log"
LOG_TAIL_CHARS = 3000

# What rank 0 of the group needs to report to the Optuna trial (trial_process.py reads these).
ENV_STORAGE, ENV_STUDY, ENV_TRIAL_ID, ENV_PRUNER = (
    "ILLADA_TRIAL_STORAGE", "ILLADA_TRIAL_STUDY", "ILLADA_TRIAL_ID", "ILLADA_TRIAL_PRUNER")


class TrialProcessError(RuntimeError):
    """The trial's process group failed (its message holds the exit code and the log's tail)."""


def trial_world_size(cfg) -> int:
    """Processes the experiment config asks for (devices per node x nodes)."""
    try:
        return world_size(cfg.accelerator, cfg.devices, cfg.num_nodes)
    except StrategyError:
        return 1  # the run itself refuses it, with the reason, inside the trial


def needs_process_group(cfg) -> bool:
    return trial_world_size(cfg) > 1


def launch_command(cfg, spec: SweepSpec, config_file: Path) -> list[str]:
    """The launcher command line for the trial's process group (module doc, step 2)."""
    entry = ["-m", "illada_lightning.sweeps.trial_process", str(config_file), "--schema", spec.schema]
    nodes, per_node = int(cfg.num_nodes), trial_world_size(cfg) // int(cfg.num_nodes)
    launcher = spec.trial_launcher
    if launcher == "auto":
        launcher = "srun" if nodes > 1 else "torchrun"
    if launcher == "srun":
        if not os.environ.get("SLURM_JOB_ID") or shutil.which("srun") is None:
            raise TrialProcessError(
                f"a trial with num_nodes={nodes} is launched with srun, inside a SLURM allocation of {nodes} nodes "
                "(run the sweep worker under sbatch/salloc, see launch/), but this worker has no SLURM job")
        return ["srun", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1",
                sys.executable, *entry]
    if nodes > 1:
        raise TrialProcessError(f"trial_launcher=torchrun starts one node; this trial asks for num_nodes={nodes} "
                                "(use trial_launcher=srun inside a SLURM allocation)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={per_node}", *entry]


def _die_with_parent() -> None:
    """In the launcher's child: SIGTERM when the worker dies (Linux), so no orphaned group trains on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the group outlives a killed worker, as any orphan would
        pass


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-LOG_TAIL_CHARS:]


def write_trial_config(cfg, trial_dir: Path) -> Path:
    trial_dir.mkdir(parents=True, exist_ok=True)
    path = trial_dir / CONFIG_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a tracking URI's password
    with os.fdopen(fd, "w") as f:
        f.write(to_yaml(cfg))
    return path


def pruning_env(spec: SweepSpec, trial) -> dict[str, str]:
    """How rank 0 of the group finds the Optuna trial to report to (empty when the sweep does not prune)."""
    if trial is None or spec.pruner.type == "none":
        return {}
    return {ENV_STORAGE: spec.resolved_storage, ENV_STUDY: spec.resolved_study_name,
            ENV_TRIAL_ID: str(trial._trial_id), ENV_PRUNER: json.dumps(dataclasses.asdict(spec.pruner))}


def run_in_process_group(cfg, spec: SweepSpec, trial_dir: Path, trial=None) -> dict:
    """Run the experiment `cfg` as a process group and return what `run_experiment` returned on rank 0.

    Raises `optuna.TrialPruned` when rank 0 pruned it, TrialProcessError when the group failed."""
    import optuna

    config_file = write_trial_config(cfg, trial_dir)
    command = launch_command(cfg, spec, config_file)
    result_file, log_file = trial_dir / RESULT_FILE, trial_dir / LOG_FILE
    result_file.unlink(missing_ok=True)
    env = {**os.environ, **pruning_env(spec, trial)}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # the worker is being stopped (Ctrl-C, SIGTERM): stop the group with it
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if code != 0 or not result_file.is_file():
        what = f"exited with code {code}" if code != 0 else "wrote no result"
        raise TrialProcessError(f"the trial's process group ({' '.join(command[:6])} ...) {what}; "
                                f"log {log_file}, last lines:\n{_tail(log_file)}")
    result = json.loads(result_file.read_text())
    if "pruned" in result:
        raise optuna.TrialPruned(result["pruned"])
    return result


def check_finished_in_mlflow(client, result: dict) -> None:
    """Every stage run the group logged ended FINISHED (the trial's result as MLflow holds it)."""
    runs = {k: v for k, v in result.get("mlflow_runs", {}).items() if k != "parent"}
    for stage, run_id in runs.items():
        status = client.get_run(run_id).info.status
        if status != "FINISHED":
            raise TrialProcessError(f"the trial's {stage} run {run_id} ended {status} in MLflow")
