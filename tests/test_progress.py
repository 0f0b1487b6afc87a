"""The training progress bar counts optimizer steps over the whole stage (`sft: step 4/6 ... ETA ...`), across
epochs, instead of restarting at every epoch."""

import re

import lightning.pytorch as pl
import torch

from illada_lightning.training.progress import StepProgressBar


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bar_counts_global_steps_across_epochs_with_an_eta(capsys):
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(6, 4), batch_size=2)  # 3 steps per epoch
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[StepProgressBar("sft", refresh_rate=1)])
    trainer.fit(Tiny(), data)
    out = capsys.readouterr().out
    steps = [int(n) for n in re.findall(r"sft: step (\d+)/6 ", out)]
    assert steps and steps[-1] == 6 and 4 in steps  # on past the first epoch's 3, out of the stage's 6
    assert "ETA" in out and "epoch=2/2" in out
    assert "Epoch 1" not in out and "v_num" not in out


class TinyWithValidation(Tiny):
    def validation_step(self, batch, _):
        self.log("val/loss", self.layer(batch).pow(2).mean())


def test_plain_lines_when_stdout_is_not_a_terminal(capsys):
    """Redirected to a file, the bar's carriage-return redraws were 29 KB of fragments: now about ten plain
    lines a stage (step, percent, ETA, metrics) and one per validation."""
    from illada_lightning.training.progress import StepProgressLines, progress_callback

    assert isinstance(progress_callback("sft"), StepProgressLines)  # pytest captures stdout: not a terminal
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(40, 4), batch_size=2)  # 20 steps per epoch
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[progress_callback("sft")], limit_val_batches=1,
                         val_check_interval=10, num_sanity_val_steps=0)
    trainer.fit(TinyWithValidation(), data, data)
    out = capsys.readouterr().out
    assert "\r" not in out and "|" not in out  # no bar, no redraws
    lines = [line for line in out.splitlines() if line.strip()]
    steps = [int(n) for n in re.findall(r"^sft: step (\d+)/40 \(\d+%\) \[", out, re.M)]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40], out  # every tenth of the stage, in order
    assert all("ETA" in line and "train/loss=" in line for line in lines if "validation" not in line)
    assert "epoch=1/2" in out and "epoch=2/2" in out
    assert len(re.findall(r"^sft: step \d+/40 validation: ", out, re.M)) == 4  # steps 10, 20, 30, 40
    assert len(lines) == 14, out


def test_a_terminal_gets_the_bar(monkeypatch):
    from illada_lightning.training.progress import progress_callback

    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    assert isinstance(progress_callback("pretrain"), StepProgressBar)
