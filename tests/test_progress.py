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
