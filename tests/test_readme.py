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
    ("python -m sweeps.run sweeps/scoring_rule.yaml",  # its benchmark tasks need files the project does not ship
     ["checkpoint=runs/default",
      'evaluation.overrides=["tasks=[cloze]","data.cloze=data/corpus/valid.txt","limit=8","scoring.mc_samples=4"]']),
]
NOT_HERE = {"pip install": "the install + test command is what CI runs (the test above checks it)"}
NEEDS_GPU = "# on a GPU"
NEEDS = "# needs "  # data or checkpoints a user brings: refused with one line naming them


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
    for command, comment in readme_commands(README.read_text()):
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
