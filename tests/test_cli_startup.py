"""Every command answers `--help`, and a typo'd key, with one clear line and without importing torch (a
new user on a loaded machine otherwise waits 15-30 s for torch to say "unknown key")."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "mlflow")

# Runs the CLI's main as `python -m` would, then reports which heavy modules got imported.
PROBE = """
import runpy, sys
sys.argv = [{module!r}] + {args!r}
code = 0
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print("IMPORTED=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def probe(module: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str], float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, args=list(args), heavy=HEAVY)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    imported = out.stderr.rsplit("IMPORTED=", 1)[-1].strip()
    return out, [m for m in imported.split(",") if m], time.perf_counter() - start


HELP = ["experiments.run", "experiments.evaluate", "experiments.generate", "experiments.inspect", "sweeps.run",
        "reports.make"]


@pytest.mark.parametrize("module", HELP)
def test_help_answers_without_importing_torch(module):
    out, imported, _ = probe(module, "--help")
    assert out.returncode == 0, out.stderr
    assert "python -m" in out.stdout  # the usage line names the command
    assert "Traceback" not in out.stderr
    assert imported == [], f"--help imported {imported}"


TYPOS = [
    ("experiments.run", ["pretrain.max_stpes=3"], "pretrain.max_stpes"),
    ("experiments.run", ["stage=sft", "init_from=/nonexistent/ckpt"], "init_from=/nonexistent/ckpt"),
    ("experiments.run", ["tokenizer.path=/nonexistent/tok"], "tokenizer.path=/nonexistent/tok"),
    ("experiments.run", ["sft.data.train_files=[/nonexistent/train.jsonl]"], "/nonexistent/train.jsonl"),
    ("experiments.run", ["stage=pretrain", "pretrain.data.val_files=[nothere.txt]"], "pretrain.data.val_files"),
    ("experiments.evaluate", ["ckpt=runs/x", "tasks=[synthetc]"], "synthetc"),
    ("experiments.evaluate", ["ckpt=/nonexistent/run", "tasks=[synthetic]"], "/nonexistent/run"),
    ("experiments.inspect", ["model.n_layerz=3"], "model.n_layerz"),
    ("sweeps.run", ["sweeps/scoring_rule.yaml", "n_trialz=3", "--validate"], "n_trialz"),
    ("reports.make", ["--sweep", "x", "--tracking-urii", "sqlite:///x.db"], "--tracking-urii"),
]


@pytest.mark.parametrize(("module", "args", "named"), TYPOS, ids=[f"{m}:{n}" for m, _, n in TYPOS])
def test_typo_is_refused_with_one_line_before_torch_is_imported(module, args, named):
    out, imported, _ = probe(module, *args)
    assert out.returncode == 2, out.stderr
    assert named in out.stderr and "Traceback" not in out.stderr
    assert "torch" not in imported and "lightning" not in imported, f"{module} imported {imported} for a typo"


def test_generate_typo_is_refused_before_torch_is_imported():
    out, imported, _ = probe("experiments.generate", "prompt=hi", "sampler.stepz=3")
    assert out.returncode == 2 and "sampler.stepz" in out.stderr
    assert "torch" not in imported


SHOW = [("experiments.run", ["pretrain.max_steps=7"], "max_steps: 7"),
        ("experiments.evaluate", ["sampler.parallel=off"], "parallel: 'off'"),
        ("experiments.generate", [], "block_length: 4")]


@pytest.mark.parametrize(("module", "args", "shown"), SHOW, ids=[m for m, _, _ in SHOW])
def test_show_config_lists_every_key_resolved_without_importing_torch(module, args, shown):
    import yaml

    out, imported, _ = probe(module, "--show-config", *args)
    assert out.returncode == 0, out.stderr
    assert shown in out.stdout and "sampler:" in out.stdout  # nested groups included
    assert isinstance(yaml.safe_load(out.stdout), dict)  # YAML a user can copy into a config file
    assert imported == [], f"--show-config imported {imported}"


def test_run_help_tells_about_multirun_and_listing_the_keys():
    out, _, _ = probe("experiments.run", "--help")
    assert "--multirun" in out.stdout and "--show-config" in out.stdout and "seed=0,1,2" in out.stdout


def test_sweeps_help_lists_every_shipped_sweep_with_a_description():
    out, _, _ = probe("sweeps.run", "--help")
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        line = next((ln for ln in out.stdout.splitlines() if f"sweeps/{path.name}" in ln), "")
        assert len(line.split(path.name, 1)[1].strip()) > 10, f"{path.name} has no description in:\n{out.stdout}"
    assert "Scoring-rule ablation (iLLaDA Table 4)" in out.stdout
