"""The run conventions module: names the rest of the package imports instead of copying."""

from __future__ import annotations

import re
from pathlib import Path

from illada_lightning import runs

PACKAGE = Path(__file__).resolve().parents[1] / "illada_lightning"


def test_every_metric_the_training_code_logs_is_a_known_training_metric():
    logged = set()
    for path in (PACKAGE / "training").glob("*.py"):
        logged |= set(re.findall(r"""["']((?:train|val)/[a-z_]+)["']""", path.read_text()))
    assert "train/tokens_seen" in logged  # the name the old sweep copy missed
    assert logged <= runs.TRAINING_METRICS, sorted(logged - runs.TRAINING_METRICS)


def test_no_module_spells_the_run_file_or_the_parent_tag_itself():
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runs.py":
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may name them
        assert '"mlflow_runs.json"' not in code and '"mlflow.parentRunId"' not in code, path


def test_default_store_and_artifacts_live_under_the_runs_root(tmp_path):
    assert runs.default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert runs.sqlite_path(runs.default_tracking_uri(tmp_path)) == tmp_path.resolve() / "mlflow.db"
    assert runs.artifact_location(None, tmp_path) == (tmp_path.resolve() / "mlartifacts").as_uri()
    db = tmp_path / "elsewhere" / "m.db"
    assert runs.artifact_location(f"sqlite:///{db}", tmp_path) == (db.parent.resolve() / "mlartifacts").as_uri()
    assert runs.artifact_location("http://127.0.0.1:5000", tmp_path) is None
    assert runs.sqlite_path("sqlite:///:memory:") is None and runs.sqlite_path("postgresql://h/db") is None


def test_store_of_a_run_dir_is_its_configured_uri_else_the_default_store_beside_it(tmp_path):
    run_dir = tmp_path / "root" / "run1"
    run_dir.mkdir(parents=True)
    assert runs.store_of_run_dir(run_dir, "http://server:5000", None) == "http://server:5000"
    assert runs.store_of_run_dir(run_dir, None, None) is None  # no store file yet
    (tmp_path / "root" / "mlflow.db").touch()
    assert runs.store_of_run_dir(run_dir, None, None) == f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mlflow.db").touch()
    assert runs.store_of_run_dir(run_dir, None, tmp_path / "other") == \
        f"sqlite:///{(tmp_path / 'other' / 'mlflow.db').resolve()}"
