"""The README's commands and Python example keep working (the two set-up commands are what CI runs, and every
shell command of the README runs in order on a fresh copy of the repository)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from illada_lightning import build_model
from illada_lightning.checkpoint import export_model
from illada_lightning.data.tokenizer import train_tokenizer_from_iterator

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    test_cmd = next(line.split("#")[0].strip() for line in block.splitlines() if "pytest" in line)
    assert test_cmd in CI.read_text()
    assert "python -m experiments.run" in block


def test_readme_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    tok = train_tokenizer_from_iterator(["What is 12 + 30? It is 42. " * 3] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=1, vocab_size=4096)
    ckpt = tmp_path / "model.pt"
    export_model(ckpt, model.config, model.state_dict(), tok.backend.to_str())
    setup = ("import torch; context_ids = torch.tensor([5, 6, 7]); cand_a = torch.tensor([8, 9]); "
             "cand_b = torch.tensor([10])\n")
    namespace: dict = {}
    exec(setup.replace("; ", "\n") + code.replace('"runs/default"', repr(str(ckpt))), namespace)  # noqa: S102
    assert namespace["scores"].shape == (2,)
    assert namespace["logits"].shape[:2] == (2, 64)


# ----------------------------------------------------------------------------- every shell command, in order

# Appended to a command in this test only, to keep the suite short: documented keys that shrink steps and
# items, never ones that change what the command does. The README's commands as written (with their wall
# times) are what the lead checks on a fresh clone; this test keeps them from rotting.
SHORTER = [
    ("python -m experiments.run --multirun", ["pretrain.max_steps=4", "pretrain.val_every_n_steps=0",
                                              "pretrain.limit_val_batches=1"]),
    ("python -m experiments.run", ["pretrain.max_steps=6", "sft.max_steps=4", "pretrain.val_every_n_steps=0",
                                   "sft.val_every_n_steps=0", "pretrain.limit_val_batches=1",
                                   "sft.limit_val_batches=1", "preview.num_prompts=1"]),
    ("python -m experiments.evaluate", ["limit=8", "scoring.mc_samples=4"]),
    ("python -m sweeps.run sweeps/lr_search.yaml", ["n_trials=2", "overrides=[stage=pretrain,pretrain.max_steps=4,"
                                                    "pretrain.val_every_n_steps=2,pretrain.optim.min_lr=1e-5,"
                                                    "progress_bar=false]"]),
    ("python -m sweeps.run sweeps/scoring_rule.yaml",  # its benchmark tasks need files the project does not ship
     ["checkpoint=runs/default",
      'evaluation.overrides=["tasks=[cloze]","data.cloze=data/corpus/valid.txt","limit=8","scoring.mc_samples=4"]']),
]
NOT_HERE = {"pip install": "the install + test command is what CI runs (the test above checks it)"}
NEEDS_GPU = "# on a GPU"
NEEDS = "# needs "  # data or checkpoints a user brings: refused with one line naming them


CLUSTER = "\n## On a cluster\n"


def split_cluster(text: str) -> tuple[str, str]:
    """(the README without its "On a cluster" section, that section): they run against different machines."""
    head, _, rest = text.partition(CLUSTER)
    section, sep, tail = rest.partition("\n## ")
    return head + sep + tail, section


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(command, trailing comment) for every line of every ```bash block, `\\` continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition("  # ")
            if command.strip():
                commands.append((command.strip(), comment.strip()))
    return commands


def shorter(command: str) -> list[str]:
    return next((extra for prefix, extra in SHORTER if command.startswith(prefix)), [])


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (no runs, caches or git)."""
    root = README.parent
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".git", "runs", ".cache", "__pycache__", "*.egg-info",
                                                               ".pytest_cache", "mlruns", "lightning_logs"))
    return dest


@pytest.mark.slow
def test_every_readme_command_runs_in_order_on_a_fresh_copy(tmp_path):
    repo = fresh_copy(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    ran, timings = [], []
    for command, comment in readme_commands(split_cluster(README.read_text())[0]):
        if any(command.startswith(p) for p in NOT_HERE):
            continue
        if NEEDS_GPU in f"  # {comment}" and not torch.cuda.is_available():
            continue
        full = " ".join([command, *map(shlex.quote, shorter(command))])
        start = time.perf_counter()
        out = subprocess.run(["bash", "-c", full], cwd=repo, env=env, capture_output=True, text=True, input="",
                             timeout=1800)
        timings.append((time.perf_counter() - start, command))
        if NEEDS in f"  # {comment}":  # refused with one line naming what is missing, no traceback
            assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr, (full, out.stderr)
            if "benchmark files" in comment:
                assert "hellaswag" in out.stderr.lower()
            continue
        assert out.returncode == 0, f"README command failed: {full}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stderr, out.stderr
        # Output to a pipe, as a user redirecting to a file sees it: plain progress lines, each log line once
        # in our format (not Lightning's own `INFO: ...` beside it), no advertisements.
        assert "\r" not in out.stdout, out.stdout[-2000:]
        assert "Tip:" not in out.stderr and not re.search(r"^INFO: ", out.stderr, re.M), out.stderr[-3000:]
        if command.startswith("python -m experiments.run --multirun"):  # tracked beside the main job, judged
            assert "experiment 'illada-lightning'" in out.stdout and "`val/loss`" in out.stdout, out.stdout
            assert "python -m reports.make --experiment illada-lightning" in out.stdout
        ran.append(command)
    assert any(c == "python -m experiments.run" for c in ran)  # the main job itself, not only its variants
    assert (repo / "runs" / "default" / "sft" / "model.pt").is_file()
    assert any(c.startswith("python -m reports.make") for c in ran)
    # the first hour's report holds the multirun (it is in the experiment the README names) as a loss table
    report = (repo / "runs" / "reports" / "illada-lightning" / "report.md").read_text()
    assert "## Sweep `multirun-" in report and "### `val/loss` by pretrain.optim.lr" in report, report[:3000]
    assert "n unknown" not in report and "× task" not in report
    print("\n".join(f"{s:6.1f} s  {c}" for s, c in timings))


# ----------------------------------------------------------------------------- "On a cluster", real services

def cluster_script(section: str, subs: list[tuple[str, str]], port: int, log: Path) -> str:
    """The section's commands as one bash script, names pointed at the test's services: the tracking server
    runs in the background until the script ends; SLURM submissions are left to tests/test_slurm_launch.py."""
    lines = ["set -euo pipefail"]
    for command, comment in readme_commands(section):
        if comment.startswith("needs SLURM"):
            continue
        for old, new in subs:
            command = command.replace(old, new)
        command = " ".join([command, *map(shlex.quote, shorter(command))])
        if "leave it running" in comment:
            lines += [f"setsid env {command} >{log} 2>&1 & server=$!", "trap 'kill -- -$server' EXIT",
                      f"{sys.executable} -c 'from tests.services import wait_healthy; "
                      f"wait_healthy(\"http://127.0.0.1:{port}\")'"]
        else:
            lines.append(command)
    return "\n".join(lines)


@pytest.mark.slow
def test_cluster_commands_run_against_real_services(tmp_path):
    import sqlalchemy
    from mlflow import MlflowClient

    from tests import services

    url = sqlalchemy.make_url(services.need("ILLADA_TEST_PG_URL"))
    tag = os.urandom(4).hex()
    role, optuna_db, mlflow_db, port = f"illada_rd_{tag}", f"optuna_{tag}", f"mlflow_{tag}", services.free_port()
    host = f"{url.host}:{url.port or 5432}"
    as_postgres = "sudo -u postgres" if shutil.which("sudo") else "runuser -u postgres --"
    subs = [("sudo -u postgres", as_postgres), ("CREATE ROLE illada ", f"CREATE ROLE {role} "),
            ("-O illada optuna", f"-O {role} {optuna_db}"), ("-O illada mlflow", f"-O {role} {mlflow_db}"),
            ("illada@db-host:5432/optuna", f"{role}@{host}/{optuna_db}"),
            ("illada@db-host:5432/mlflow", f"{role}@{host}/{mlflow_db}"),
            ("mlflow-host:5000", f"127.0.0.1:{port}"), ("--port 5000", f"--port {port}"), ("change-me", f"pw-{tag}"),
            ("file:///srv/mlartifacts", (tmp_path / "artifacts").as_uri()), ("--host 0.0.0.0", "--host 127.0.0.1")]
    section = split_cluster(README.read_text())[1]
    unused = [old for old, _ in subs if old not in section]
    assert not unused, f"the README's cluster commands changed; update this test's names: {unused}"
    repo = fresh_copy(tmp_path / "repo")
    script = cluster_script(section, subs, port, tmp_path / "mlflow.log")
    env = {**os.environ, "PYTHONPATH": str(repo), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PGPASSWORD", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runners beside the test's server
    try:
        out = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, f"{script}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert "2 complete, 0 failed" in out.stdout and f"pw-{tag}" not in out.stdout + out.stderr
        # What the UI shows, read back from the server's database: the sweep's trials and the run, all finished.
        client = MlflowClient(f"postgresql+psycopg://{role}:pw-{tag}@{host}/{mlflow_db}")
        trials = client.search_runs([client.get_experiment_by_name("lr_search").experiment_id],
                                    "tags.`sweep.role` = 'trial'")
        job = client.search_runs([client.get_experiment_by_name("illada-lightning").experiment_id],
                                 "tags.`illada.experiment` = 'on-the-server'")
        assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in [*trials, *job]) and len(job) == 2
    finally:
        drops = [f"DROP DATABASE IF EXISTS {optuna_db} WITH (FORCE)", f"DROP DATABASE IF EXISTS {mlflow_db} WITH (FORCE)",
                 f"DROP ROLE IF EXISTS {role}"]
        subprocess.run([*as_postgres.split(), "psql", "-q", *[a for d in drops for a in ("-c", d)]],
                       capture_output=True)
