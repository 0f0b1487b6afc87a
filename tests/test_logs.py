"""One logging configuration (`illada_lightning.logs`): every Lightning line once, no advertisements, no
warnings that are neither ours nor actionable."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A short Lightning fit as the CLIs run it: configure, import Lightning (which installs its own handler),
# configure again, train 3 steps in epochs shorter than the logging interval, with a logger attached.
SCRIPT = """
import logging
from illada_lightning.logs import configure_logging
configure_logging()
import torch
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
configure_logging()

class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def training_step(self, batch, _):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = torch.utils.data.DataLoader(torch.randn(6, 4), batch_size=2)
trainer = pl.Trainer(max_steps=3, log_every_n_steps=10, logger=CSVLogger({tmp!r}), enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
trainer.fit(Tiny(), data)
logging.getLogger("illada_lightning.test").info("ours")
"""


def test_lightning_lines_print_once_without_ads_or_foreign_warnings(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tmp=str(tmp_path))], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert sum("GPU available" in line for line in lines) == 1, out.stderr  # was printed twice
    assert "INFO illada_lightning.test: ours" in lines  # our format, our messages kept
    for noise in ("Tip:", "litlogger", "LeafSpec", "smaller than the logging interval"):
        assert noise not in out.stderr, f"{noise!r} in:\n{out.stderr}"
    assert len(lines) == len(set(lines)), out.stderr  # no line twice


def test_configure_logging_is_idempotent():
    import logging

    from illada_lightning.logs import configure_logging

    before = list(logging.getLogger().handlers)
    first = configure_logging()
    assert configure_logging() is first
    assert logging.getLogger().handlers.count(first) == 1
    for handler in logging.getLogger().handlers:
        if handler not in before and handler is not first:
            raise AssertionError("a second handler was installed")


# A sweep's trial as `experiments.run --multirun` runs it: logging configured first, Lightning imported later
# (inside the trial), then our trainer factory builds the Trainer. Lightning's own handler printed every line
# twice (`INFO: ...` and `INFO lightning...: ...`) with its advertisement.
LATE_IMPORT = """
from illada_lightning.logs import configure_logging
configure_logging()
from illada_lightning.config import load_config
from illada_lightning.training.config import TrainingConfig
from illada_lightning.training.trainer_factory import make_trainer
cfg = load_config(TrainingConfig, None, ["accelerator=cpu", "progress_bar=false"])
make_trainer(cfg, "pretrain", __import__("pathlib").Path({tmp!r}), None)
"""


def test_lightning_imported_after_configuring_still_prints_each_line_once(tmp_path):
    out = subprocess.run([sys.executable, "-c", LATE_IMPORT.format(tmp=str(tmp_path))], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert sum("GPU available" in line for line in lines) == 1, out.stderr
    assert not any(line.startswith("INFO: ") for line in lines), out.stderr  # Lightning's own format
    assert "Tip:" not in out.stderr, out.stderr


def test_reapply_does_nothing_where_no_command_configured_logging():
    script = ("import logging; from illada_lightning.logs import reapply_logging, configured_level\n"
              "reapply_logging(); assert configured_level() is None and not logging.getLogger().handlers\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
