"""Crash drills on checkpoints (issue 14, items 1, 3, 4, 5, 6): no poisoned, partial or dangling state survives.

Each drill is a tiny CPU run: a huge LR that makes the weights non-finite, weights poisoned mid-run under
on_nan=rollback, a crash followed by a truncated newest checkpoint and a dangling last.ckpt, a write that
fails half-way (the file-size limit of the OS, as a full disk would), unwritable run directories and
unreachable MLflow stores.
"""

from __future__ import annotations

import logging
import resource
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from experiments.run import main as cli_main
from illada_lightning.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_problem,
    step_checkpoints,
)
from illada_lightning.config import ConfigError
from illada_lightning.experiment.run import run_experiment
from illada_lightning.training.callbacks import NonFiniteLossError
from illada_lightning.training.experiment import RunDirectoryError
from illada_lightning.training.tracking import check_tracking_uri
from tests.test_run_experiment import SimulatedCrash, StopAt, small_config

QUICK = ["stage=pretrain", "pretrain.val_every_n_steps=0", "pretrain.optim.warmup_steps=0", "preview.num_prompts=0"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("illada-cache")


def ckpt_files(root: Path, name: str = "default") -> list[Path]:
    return sorted((root / name / "pretrain" / "checkpoints").glob("*.ckpt"))


def nonfinite(path: Path) -> int:
    state = torch.load(path, weights_only=False)["state_dict"]
    return sum(not torch.isfinite(v).all() for v in state.values())


def statuses(root: Path, name: str = "default") -> dict[str, str]:
    """MLflow status of each run in <root>/<name>/mlflow_runs.json (default store <root>/mlflow.db)."""
    import json

    from mlflow.tracking import MlflowClient

    runs = json.loads((root / name / "mlflow_runs.json").read_text())
    client = MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    return {k: client.get_run(v).info.status for k, v in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("nan_check", [[], ["nan_check=deferred", "pretrain.optim.fused=true"]], ids=["sync", "deferred"])
def test_huge_lr_never_checkpoints_nonfinite_weights(tmp_path, data_cache, nan_check):
    """Item 1: lr=1e6 makes weights NaN while the loss is finite; nothing non-finite is saved or recommended,
    and the MLflow runs end FAILED (item 5). The same with the deferred (device-side) check."""
    cfg = small_config(tmp_path, data_cache, *QUICK, "pretrain.max_steps=12", "pretrain.ckpt_every_n_steps=2",
                       "pretrain.optim.lr=1e6", "pretrain.optim.grad_clip=0", "on_nan=stop", *nan_check)
    with pytest.raises(NonFiniteLossError, match="non-finite at step") as info:
        run_experiment(cfg, preview=False)
    files = ckpt_files(tmp_path)
    assert all(nonfinite(f) == 0 for f in files), [(f.name, nonfinite(f)) for f in files]
    named = [w for w in str(info.value).split() if w.endswith(".ckpt") or w.endswith(".ckpt.")]
    assert all(nonfinite(Path(w.rstrip("."))) == 0 for w in named), str(info.value)
    assert statuses(tmp_path) == {"parent": "FAILED", "pretrain": "FAILED"}


class PoisonWeightsOnce(Callback):
    """Make every weight NaN just before the optimizer step that ends at `step` (first time only)."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.done and trainer.global_step + 1 == self.step:
            self.done = True
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


@pytest.mark.slow
def test_rollback_goes_to_newest_finite_checkpoint(tmp_path, data_cache):
    """Item 1: weights poisoned at step 4 are not saved; rollback reloads step 2 and finishes; keep-K holds."""
    cfg = small_config(tmp_path, data_cache, *QUICK, "pretrain.max_steps=8", "pretrain.ckpt_every_n_steps=2",
                       "pretrain.ckpt_keep=2", "on_nan=rollback", "mlflow.enabled=false")
    result = run_experiment(cfg, extra_callbacks=[PoisonWeightsOnce(4)], preview=False)
    summary = result["stages"]["pretrain"]
    assert summary["rollbacks"] == 1 and summary["global_step"] == 8
    files = ckpt_files(tmp_path)
    assert [f.name for f in files] == ["last.ckpt", "step=0000006.ckpt", "step=0000008.ckpt"]  # ckpt_keep=2
    assert all(nonfinite(f) == 0 for f in files)
    assert (tmp_path / "default" / "pretrain" / "checkpoints" / "last.ckpt").resolve().name == "step=0000008.ckpt"


@pytest.mark.slow
def test_resume_skips_truncated_newest_and_dangling_link(tmp_path, data_cache, caplog):
    """Item 3 (and 6): after a crash, a truncated newest checkpoint and a dangling last.ckpt, resume=auto
    continues from the previous good checkpoint with a warning naming the bad one; the summary still
    covers the whole run."""
    common = [*QUICK, "pretrain.ckpt_every_n_steps=2", "pretrain.ckpt_keep=3", "mlflow.enabled=false",
              "pretrain.val_every_n_steps=0", "pretrain.limit_val_batches=1"]
    with pytest.raises(SimulatedCrash):
        run_experiment(small_config(tmp_path, data_cache, *common, "pretrain.max_steps=8"),
                       extra_callbacks=[StopAt(5)], preview=False)
    ckpt_dir = tmp_path / "default" / "pretrain" / "checkpoints"
    newest = ckpt_dir / "step=0000004.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (ckpt_dir / "last.ckpt").unlink()
    (ckpt_dir / "last.ckpt").symlink_to("step=0000099.ckpt")
    partial = ckpt_dir / ".step=0000006.ckpt.tmp-12345"  # a write the crash interrupted
    partial.write_bytes(b"partial")
    before = torch.load(ckpt_dir / "step=0000002.ckpt", weights_only=False)["illada_run_record"]
    with caplog.at_level(logging.WARNING):
        result = run_experiment(small_config(tmp_path, data_cache, *common, "pretrain.max_steps=8", "resume=auto"),
                                preview=False)
    summary = result["stages"]["pretrain"]
    assert summary["resumed_from_step"] == 2 and summary["global_step"] == 8
    assert f"skipping checkpoint {newest}: unreadable" in caplog.text
    assert not partial.exists()
    assert summary["summary_covers"] == "whole run"
    assert summary["first_loss"] == before["first_losses"][0][1]
    assert summary["initial_val_loss"] == before["initial_val_loss"] is not None
    assert summary["wall_time_s"] > before["wall_time_s"]

    # Nothing usable left: refuse to start from scratch beside the broken checkpoints.
    for f in step_checkpoints(ckpt_dir):
        f.write_bytes(b"")
    (tmp_path / "default" / "pretrain" / "FINISHED").unlink()
    with pytest.raises(CheckpointError, match="refusing to start from scratch"):
        run_experiment(small_config(tmp_path, data_cache, *common, "pretrain.max_steps=10", "resume=auto"),
                       preview=False)


class FileSizeLimit(Callback):
    """From the first training step on, the OS refuses to grow any file beyond `limit` bytes (as a full disk)."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_train_start(self, trainer, pl_module):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.previous = (soft, hard)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, hard))

    def undo(self):
        if hasattr(self, "previous"):
            resource.setrlimit(resource.RLIMIT_FSIZE, self.previous)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def test_atomic_write_that_fails_half_way_leaves_nothing(tmp_path):
    """Item 4, unit level: the OS refuses to grow the file past 64 kB in the middle of torch.save."""
    target = tmp_path / "step=0000001.ckpt"
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(CheckpointError, match=r"^cannot write .*step=0000001\.ckpt: File too large$"):
            atomic_write(target, lambda f: torch.save({"state_dict": {"w": torch.zeros(100_000)}}, f))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda f: torch.save({"state_dict": {"w": torch.zeros(10)}}, f))
    assert checkpoint_problem(target) is None


@pytest.mark.slow
def test_failed_write_leaves_no_partial_checkpoint(tmp_path, data_cache):
    """Item 4: a checkpoint write that fails half-way leaves no file under a checkpoint name, and the error
    is one line naming the path."""
    limit = FileSizeLimit(200_000)  # the tiny model's checkpoint is about 1.3 MB
    cfg = small_config(tmp_path, data_cache, *QUICK, "pretrain.max_steps=4", "pretrain.ckpt_every_n_steps=2",
                       "mlflow.enabled=false")
    try:
        with pytest.raises(CheckpointError) as info:
            run_experiment(cfg, extra_callbacks=[limit], preview=False)
    finally:
        limit.undo()
    ckpt_dir = tmp_path / "default" / "pretrain" / "checkpoints"
    assert str(info.value) == f"cannot write {ckpt_dir / 'step=0000002.ckpt'}: File too large"
    assert [p.name for p in ckpt_dir.iterdir()] == []  # no partial file, no temporary file


def test_unwritable_run_dir_and_bad_tracking_stores_are_refused_before_training(tmp_path, data_cache, capsys):
    """Item 4: one-line errors naming the path or URI, before any training step."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirectoryError, match=f"run directory {blocker}/default is not writable: Not a directory"):
        run_experiment(small_config(blocker, data_cache, *QUICK, "mlflow.enabled=false"))
    missing = tmp_path / "no" / "such" / "dir" / "mlflow.db"
    with pytest.raises(ConfigError, match=f"directory {missing.parent} does not exist"):
        run_experiment(small_config(tmp_path / "runs", data_cache, *QUICK, f"mlflow.tracking_uri=sqlite:///{missing}"))
    assert not missing.parent.exists()
    # Under the runs root the directory is created, as for the default store.
    from illada_lightning.training.config import MLflowConfig

    inside = tmp_path / "runs" / "stores" / "mlflow.db"
    check_tracking_uri(MLflowConfig(tracking_uri=f"sqlite:///{inside}"), tmp_path / "runs")
    assert inside.parent.is_dir()
    args = ["stage=pretrain", f"runs_root={tmp_path / 'runs'}", "mlflow.tracking_uri=http://127.0.0.1:9"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mlflow.tracking_uri=http://127.0.0.1:9: cannot reach the tracking server")
    assert "\n" not in err
    assert not ckpt_files(tmp_path / "runs")


def test_completeness_of_files_and_sharded_directories(tmp_path):
    """The one "complete and loadable?" test: a sharded checkpoint counts once DCP's .metadata exists."""
    sharded = tmp_path / "step=0000004.ckpt"
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"shard")
    assert "without .metadata" in checkpoint_problem(sharded)
    (sharded / ".metadata").write_bytes(b"meta")
    assert checkpoint_problem(sharded) is None
    good = tmp_path / "step=0000002.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert checkpoint_problem(good) is None
    good.with_name("step=0000003.ckpt").write_bytes(good.read_bytes()[:40])
    assert checkpoint_problem(tmp_path / "step=0000003.ckpt").startswith("unreadable")
    (tmp_path / "last.ckpt").symlink_to("step=0000009.ckpt")
    assert checkpoint_problem(tmp_path / "last.ckpt") == "dangling link to step=0000009.ckpt"
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step=0000004.ckpt", "step=0000003.ckpt",
                                                            "step=0000002.ckpt"]


class AssertRunning(Callback):
    """Reads the stage's MLflow run status in the middle of training."""

    def __init__(self):
        self.seen: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logger = trainer.loggers[0]
        self.seen.append(logger.experiment.get_run(logger.run_id).info.status)


@pytest.mark.slow
def test_stage_run_is_running_during_training_and_finished_after(tmp_path, data_cache):
    """Item 5: Lightning's logger closed the child run FINISHED after the validation before training."""
    probe = AssertRunning()
    cfg = small_config(tmp_path, data_cache, *QUICK, "pretrain.max_steps=3", "pretrain.val_every_n_steps=2",
                       "pretrain.ckpt_every_n_steps=0")
    run_experiment(cfg, extra_callbacks=[probe], preview=False)
    assert probe.seen and set(probe.seen) == {"RUNNING"}
    assert statuses(tmp_path) == {"parent": "FINISHED", "pretrain": "FINISHED"}
