"""The cluster launch scripts (`launch/`) and the SLURM requeue, on CPU, without a SLURM cluster.

No SLURM here, so two stand-ins on PATH play its part, written by the `standins` fixture:
- `scontrol` stands in for SLURM's controller: it records every call (`requeue <job>` is what the real one
  would turn into a requeue of the job) and answers `show hostnames LIST` as SLURM does;
- `srun` stands in for SLURM's task launcher on one node: it records its arguments and starts `STANDIN_TASKS`
  copies of the command with the task variables srun sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID).
The job's own variables (SLURM_JOB_ID, SLURM_NTASKS, ...) are set as sbatch would set them. The drill then
plays SLURM's time-limit warning: SIGUSR1 to the training task, a checkpoint, the requeue recorded by the
stand-in, and the requeued job (the same script and arguments, SLURM_RESTART_COUNT=1) resuming with the losses
of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from illada_lightning.checkpoint import step_checkpoints
from illada_lightning.config import load_config
from illada_lightning.training import slurm
from illada_lightning.training.config import TrainingConfig
from tests.test_run_experiment import REPO, SMALL

LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.slurm")) + sorted(LAUNCH.glob("*.sh"))

SRUN = """#!/bin/bash
# Stands in for SLURM's srun on one node: records the call, starts STANDIN_TASKS copies of the command.
echo "srun $*" >> "$STANDIN_DIR/srun.log"
while [[ ${1:-} == -* ]]; do shift; done   # srun's own options (the scripts write them as --key=value)
pids=()
for (( i = 0; i < ${STANDIN_TASKS:-1}; i++ )); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
  echo $! >> "$STANDIN_DIR/tasks"
done
status=0
for p in "${pids[@]}"; do code=0; wait "$p" || code=$?; (( code == 0 )) || status=$code; done
exit $status
"""

SCONTROL = """#!/bin/bash
# Stands in for SLURM's controller: records each call; `requeue JOB` is what the real one would requeue.
echo "$*" >> "$STANDIN_DIR/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<< "$3"; fi
exit ${STANDIN_SCONTROL_EXIT:-0}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def standins(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.fixture
def no_cluster(monkeypatch):
    """This process outside any launcher, whatever the machine running the tests is."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key)


def slurm_job_env(monkeypatch, **extra: str) -> None:
    """What sbatch + srun set for a one-task job (`--ntasks-per-node=1`)."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "illada-train", "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost", **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# -------------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_is_valid_bash(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert script.read_text().startswith("#!/bin/bash\n")


def test_slurm_scripts_ask_for_the_requeue_signal_and_resume():
    for name in ("train.slurm", "train_torchrun.slurm"):
        text = (LAUNCH / name).read_text()
        assert "#SBATCH --signal=USR1@90" in text and "#SBATCH --requeue" in text, name
        assert "resume=auto" in text and "strategy=fsdp" in text, name
    torchrun = (LAUNCH / "train_torchrun.slurm").read_text()
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in torchrun


def test_validate_checks_a_training_command_without_training_or_importing_torch():
    from tests.test_cli_startup import probe

    out, imported, _ = probe("experiments.run", "strategy=fsdp", "devices=8", "num_nodes=2", "resume=auto",
                             "--validate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("config is valid: stage=sft strategy=fsdp devices=8 num_nodes=2 resume=auto")
    assert imported == []
    out, _, _ = probe("experiments.run", "--validate", "num_nodes=0")
    assert out.returncode == 2 and "error: num_nodes must be >= 1, got 0" in out.stderr


# ------------------------------------------------------------------------------------------------- slurm.py
def test_job_id_names_the_array_task(no_cluster, monkeypatch):
    assert slurm.job_id() is None and slurm.slurm_tags() == {}
    slurm_job_env(monkeypatch, SLURM_RESTART_COUNT="2")
    assert slurm.job_id() == "4242"
    assert slurm.slurm_tags() == {"slurm.job_id": "4242", "slurm.restart_count": "2"}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm.job_id() == "4240_2"


def test_cluster_environment_leaves_sigusr1_to_graceful_stop(no_cluster, monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from illada_lightning.training.trainer_factory import make_trainer

    assert slurm.cluster_environment(1, 1) is None  # outside SLURM: Lightning's own choice
    slurm_job_env(monkeypatch, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2")
    env = slurm.cluster_environment(2, 1)
    assert type(env) is SLURMEnvironment and env.auto_requeue is False
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun inside the job: torchrun's ranks
    assert slurm.cluster_environment(2, 1) is None
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    slurm_job_env(monkeypatch)  # one task asking for two devices: Lightning starts them itself
    assert type(slurm.cluster_environment(2, 1)) is LightningEnvironment

    cfg = load_config(TrainingConfig, None, ["accelerator=cpu", "devices=1", "progress_bar=false"])
    trainer = make_trainer(cfg, "pretrain", Path("unused"), None)
    env = trainer._accelerator_connector.cluster_environment
    assert type(env) is SLURMEnvironment and env.auto_requeue is False
    before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()  # what every fit / validate does first
    try:
        assert signal.getsignal(signal.SIGUSR1) is before  # no hpc_ckpt save + requeue handler of Lightning's
    finally:
        trainer._signal_connector.teardown()


def test_requeue_only_for_sigusr1_under_slurm_with_resume_auto(no_cluster, monkeypatch):
    cfg = load_config(TrainingConfig, None, ["resume=auto"])
    assert not slurm.requeue_wanted(cfg, signal.SIGUSR1)  # not a SLURM job
    slurm_job_env(monkeypatch)
    assert slurm.requeue_wanted(cfg, signal.SIGUSR1)
    assert not slurm.requeue_wanted(cfg, signal.SIGTERM)  # scancel / the limit itself: stop only
    assert not slurm.requeue_wanted(load_config(TrainingConfig, None, ["resume=never"]), signal.SIGUSR1)
    assert not slurm.requeue_wanted(load_config(TrainingConfig, None, ["resume=auto", "slurm_requeue=false"]),
                                    signal.SIGUSR1)


def test_request_requeue_calls_scontrol_and_reports_a_refusal(no_cluster, monkeypatch, standins, tmp_path):
    monkeypatch.setenv("PATH", f"{standins}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_DIR", str(tmp_path))
    slurm_job_env(monkeypatch, SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="3")
    accepted, line = slurm.request_requeue()
    assert accepted and line.startswith("requeued SLURM job 4240_3")
    monkeypatch.setenv("STANDIN_SCONTROL_EXIT", "1")
    accepted, line = slurm.request_requeue()
    assert not accepted and "scontrol exited 1" in line
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4240_3", "requeue 4240_3"]


# ----------------------------------------------------------------------------------------------- end to end
def job_env(tmp_path: Path, standins: Path, **extra: str) -> dict[str, str]:
    """The environment of a batch job on one node, with the stand-ins first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update({
        "PATH": f"{standins}{os.pathsep}{env['PATH']}", "STANDIN_DIR": str(tmp_path), "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "illada-train", "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_NNODES": "1", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost", **extra,
    })
    return env


def data_args(root: Path, cache: Path) -> list[str]:
    return [*SMALL, f"runs_root={root}", f"pretrain.data.cache_dir={cache}", f"sft.data.cache_dir={cache}",
            "accelerator=cpu", "stage=pretrain", "pretrain.val_every_n_steps=0",
            "pretrain.limit_val_batches=1", "pretrain.optim.warmup_steps=2", "preview.num_prompts=0"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("illada-cache")


def torchrun_path() -> str:
    path = Path(sys.executable).with_name("torchrun")
    if not path.is_file():
        pytest.skip(f"no torchrun beside {sys.executable}")
    return str(path)


@pytest.mark.slow
def test_launch_scripts_build_commands_that_validate(tmp_path, standins):
    """The training and sweep scripts through the stand-in srun, with `--validate` passed on: the command each
    builds is checked by the entry point itself (the torchrun script trains for real below)."""
    env = job_env(tmp_path, standins, SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="8", SLURM_NTASKS="16")
    out = subprocess.run(["bash", str(LAUNCH / "train.slurm"), "experiments/configs/small_gpu.yaml",
                          "name=big", "--validate"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("config is valid: stage=all strategy=fsdp devices=8 num_nodes=2 resume=auto run_dir=runs/big"
            in out.stdout)

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env.update(SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1", SLURM_NTASKS="1", OPTUNA_STORAGE=storage,
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", WORKERS_PER_NODE="2",
               CUDA_VISIBLE_DEVICES="0,1", SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="0")
    out = subprocess.run(["bash", str(LAUNCH / "sweep_workers.slurm"), "sweeps/lr_search.yaml", "--validate"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worker 0: GPUs 0" in out.stdout and "worker 1: GPUs 1" in out.stdout
    assert out.stdout.count("sweep 'lr_search' is valid") == 2 and storage in out.stdout
    srun = (tmp_path / "srun.log").read_text().splitlines()
    assert srun[0] == (f"srun --kill-on-bad-exit=0 {sys.executable} -m experiments.run "
                       "experiments/configs/small_gpu.yaml strategy=fsdp num_nodes=2 devices=8 resume=auto "
                       "name=big --validate")
    assert srun[-1] == ("srun --kill-on-bad-exit=0 --ntasks-per-node=1 bash launch/sweep_node.sh "
                        "sweeps/lr_search.yaml --validate")

    # Array tasks of two nodes (trials over both): one worker in the batch shell, no srun of the script's own.
    env.update(SLURM_NNODES="2", SLURM_NTASKS="2")
    out = subprocess.run(["bash", str(LAUNCH / "sweep_workers.slurm"), "sweeps/lr_search.yaml", "--validate"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worker 0: GPUs 0,1" in out.stdout and "worker 1" not in out.stdout
    assert out.stdout.count("sweep 'lr_search' is valid") == 1
    assert (tmp_path / "srun.log").read_text().splitlines() == srun


def losses(client, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes_with_the_same_losses(tmp_path, standins,
                                                                                        data_cache):
    from mlflow.tracking import MlflowClient

    steps = 30
    args = [*data_args(tmp_path, data_cache), f"pretrain.max_steps={steps}", "pretrain.ckpt_every_n_steps=2",
            "pretrain.log_every_n_steps=1"]
    env = job_env(tmp_path, standins)
    script = ["bash", str(LAUNCH / "train.slurm"), *args, "name=drill"]

    # First start of the job: SLURM's warning (SIGUSR1 to the task) once training has saved its first step.
    job = subprocess.Popen(script, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    ckpts = tmp_path / "drill" / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 300
    while not step_checkpoints(ckpts):
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    task = int((tmp_path / "tasks").read_text().split()[0])
    os.kill(task, signal.SIGUSR1)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGUSR1, err[-3000:]
    stopped = next(x for x in err.splitlines() if x.startswith("error: training interrupted by SIGUSR1"))
    step = int(stopped.split("pretrain step ")[1].split(";")[0])
    assert 2 <= step < steps, stopped
    assert f"checkpoint saved: {ckpts / f'step={step:07d}.ckpt'}" in stopped
    assert "requeued SLURM job 4242: it reruns this command" in err
    # What the real controller would have turned into a requeue of job 4242:
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    assert not list(tmp_path.rglob("hpc_ckpt_*"))  # Lightning's own requeue checkpoint was never written

    # The requeued job: the same script and arguments, SLURM_RESTART_COUNT=1.
    (tmp_path / "tasks").unlink()
    again = subprocess.run(script, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout

    # The uninterrupted run: the same command without SLURM (and without the script).
    plain = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    whole = subprocess.run([sys.executable, "-m", "experiments.run", *args, "name=whole", "strategy=fsdp",
                            "devices=1", "num_nodes=1", "resume=auto"], cwd=REPO, env=plain,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = client.search_runs([client.get_experiment_by_name("illada-lightning").experiment_id],
                               "tags.`illada.experiment` = 'drill' and tags.`illada.stage` = 'pretrain'",
                               order_by=["attributes.start_time ASC"])
    assert len(first) == 2
    stopped_run, resumed_run = first
    assert stopped_run.info.status == "KILLED" and resumed_run.info.status == "FINISHED"
    assert stopped_run.data.tags["illada.requeued"].startswith("requeued SLURM job 4242")
    assert stopped_run.data.tags["slurm.restart_count"] == "0"
    assert resumed_run.data.tags["slurm.restart_count"] == "1"
    assert resumed_run.data.tags["slurm.job_id"] == "4242"
    assert resumed_run.data.tags["illada.previous_attempt"] == stopped_run.info.run_id
    assert resumed_run.data.tags["illada.attempt"] == "2"
    parent = client.get_run(stopped_run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert resumed_run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    # MLflow's step of a training loss is its batch index: steps 0..step-1 ran before the stop.
    before, after = losses(client, stopped_run.info.run_id), losses(client, resumed_run.info.run_id)
    assert sorted(before) == list(range(step)) and sorted(after) == list(range(step, steps))
    reference = losses(client, json.loads((tmp_path / "whole" / "mlflow_runs.json").read_text())["pretrain"])
    assert sorted(reference) == list(range(steps))
    joined = {**before, **after}
    for k, value in joined.items():
        assert value == pytest.approx(reference[k], rel=1e-6, abs=1e-7), f"step {k}"
    worst = max(abs(joined[k] - reference[k]) for k in reference)
    # The drill's record (shown with pytest -s).
    said = [x for x in err.splitlines() if x.startswith(("error:", "requeued", "resume with:"))]
    print("\nrequeue drill, first start:\n  " + "\n  ".join(said))
    print(f"stand-in scontrol recorded: {(tmp_path / 'scontrol.log').read_text().strip()!r}")
    print("train/loss by step (interrupted job, then requeued job | uninterrupted run):")
    for k in range(max(0, step - 3), step + 3):
        print(f"  {k:2d}  {joined[k]:.7f} ({'before' if k < step else 'after'})  | {reference[k]:.7f}")
    print(f"largest difference over the {steps} steps: {worst:.3g}")


@pytest.mark.slow
def test_torchrun_script_trains_fsdp_on_two_cpu_processes(tmp_path, standins, data_cache):
    env = job_env(tmp_path, standins, GPUS_PER_NODE="2", RDZV_PORT=str(free_port()), TORCHRUN=torchrun_path())
    args = [*data_args(tmp_path, data_cache), "pretrain.max_steps=4", "pretrain.ckpt_every_n_steps=2",
            "mlflow.enabled=false", "name=tr"]
    out = subprocess.run(["bash", str(LAUNCH / "train_torchrun.slurm"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "srun.log").read_text().startswith(
        f"srun --kill-on-bad-exit=0 --ntasks-per-node=1 {env['TORCHRUN']} --nnodes 1 --nproc-per-node 2 "
        f"--rdzv-backend c10d --rdzv-endpoint localhost:{env['RDZV_PORT']} --rdzv-id 4242 ")
    assert (tmp_path / "scontrol.log").read_text() == "show hostnames localhost\n"  # the rendezvous host
    assert "[pretrain] 4 steps" in out.stdout
    assert (tmp_path / "tr" / "pretrain" / "FINISHED").is_file()
    # Sharded over the two workers: one DCP shard file per rank.
    final = tmp_path / "tr" / "pretrain" / "checkpoints" / "step=0000004.ckpt"
    shards = sorted(p.name for p in final.iterdir())
    assert [s for s in shards if s.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"], shards
