"""SLURM: the cluster environment a Trainer gets, and the requeue of a job that reaches its time limit.

Who owns SIGUSR1. SLURM sends it `sig_time` seconds before the time limit (`#SBATCH --signal=USR1@90`).
Lightning's `SLURMEnvironment(auto_requeue=True)`, what it picks by default under SLURM, answers it in its
`_SignalConnector`: from inside the signal handler (in the middle of a step, whatever the other ranks are
doing) it saves `hpc_ckpt_<n>.ckpt` in the Trainer's root directory, finalizes the loggers as finished, runs
`scontrol requeue` and lets training go on until SLURM kills the job; the requeued job restarts from that file
whenever `fit` gets no `ckpt_path`. Beside our `GracefulStop` that would give two checkpoints of two steps in
two formats, MLflow runs closed FINISHED by a job being killed, and a requeued job resuming from whichever
file it met first. So one owner, ours:

- every Trainer under SLURM gets `SLURMEnvironment(auto_requeue=False)` (`cluster_environment`): Lightning
  then installs neither its SIGUSR1 handler nor its SIGTERM bypass, and writes no `hpc_ckpt_*` file;
- `GracefulStop` (interrupt.py) treats SIGUSR1 like SIGTERM: at the end of the current optimizer step every
  rank agrees on the stop, the step is checkpointed by `StepCheckpoint` (the files `resume=auto` reads,
  sharded under FSDP2), and training stops;
- `run_training` closes the MLflow runs KILLED with `illada.requeued` naming the job, and rank 0 asks SLURM
  for the requeue (`request_requeue`: `scontrol requeue <job>`) last, because SLURM ends the job right away;
- the requeued job runs the same batch script, whose command carries `resume=auto`: it continues from that
  checkpoint in a new MLflow attempt run (`illada.attempt` + 1, `illada.previous_attempt`,
  `slurm.restart_count`), under the same parent run.

The requeue needs `resume=auto` (a requeued `resume=never` command would refuse its own run directory) and
`slurm_requeue=true` (the default); otherwise SIGUSR1 saves and stops, as SIGTERM does. SIGTERM (scancel, the
time limit itself, pre-emption) never requeues here: SLURM requeues a pre-empted `--requeue` job by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from ..runs import SLURM_JOB_TAG, SLURM_RESTART_TAG

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1  # what `#SBATCH --signal=USR1@90` sends (Lightning's default requeue signal)


def under_slurm() -> bool:
    """This process runs in a SLURM job (Lightning's test: SLURM_NTASKS set, not an interactive job name)."""
    return SLURMEnvironment.detect()


def job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else `SLURM_JOB_ID`."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_tags() -> dict[str, str]:
    """MLflow tags of a run made under SLURM: the job, and how often it was requeued (0 at first)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    return {SLURM_JOB_TAG: job_id() or "", SLURM_RESTART_TAG: os.environ.get("SLURM_RESTART_COUNT", "0")}


def cluster_environment(world_size: int, num_nodes: int) -> ClusterEnvironment | None:
    """The Trainer's cluster environment under SLURM; None elsewhere (Lightning chooses).

    - torchrun inside a SLURM job: None, so Lightning picks `TorchElasticEnvironment` (torchrun's ranks);
    - one SLURM task asking for several devices of its node (a sweep worker, `python` without `srun` in a
      batch script): `LightningEnvironment`, so Lightning starts the processes itself, as outside SLURM;
    - otherwise SLURM started every process: `SLURMEnvironment(auto_requeue=False)`, whose task counts
      Lightning checks against `devices` and `num_nodes`; SIGUSR1 stays with `GracefulStop` (see above).
    """
    if TorchElasticEnvironment.detect() or not under_slurm():
        return None
    if int(os.environ["SLURM_NTASKS"]) == 1 and world_size > 1 and num_nodes == 1:
        return LightningEnvironment()
    return SLURMEnvironment(auto_requeue=False)


def requeue_wanted(cfg, signum: int | None) -> bool:
    """A stop by SLURM's time-limit warning, in a job the requeued copy can continue."""
    if signum != REQUEUE_SIGNAL or not under_slurm() or not job_id():
        return False
    if not cfg.slurm_requeue:
        log.info("SIGUSR1: slurm_requeue=false, so the job stops without a requeue")
        return False
    if cfg.resume != "auto":
        log.warning("SIGUSR1 under SLURM: not requeued, the command has resume=%s and the requeued job would "
                    "refuse this run directory; add resume=auto to the batch script's command", cfg.resume)
        return False
    return True


def request_requeue(timeout_s: float = 60.0) -> tuple[bool, str]:
    """`scontrol requeue <job>` (rank 0, after the checkpoint and the MLflow runs are closed). Returns whether
    SLURM accepted, and a line saying what happened."""
    job = job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"requeue of SLURM job {job} failed: scontrol could not run ({exc})"
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        return False, (f"requeue of SLURM job {job} failed: scontrol exited {done.returncode}"
                       + (f" ({reason[-1]})" if reason else ""))
    return True, (f"requeued SLURM job {job}: it reruns this command and resumes from the checkpoint "
                  "(resume=auto)")
