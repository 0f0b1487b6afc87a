"""The per-epoch evaluation callback: one point per epoch against the epoch, no training state disturbed."""

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger

from illada_lightning.evaluation import EvalConfig
from illada_lightning.evaluation.callback import PerEpochEvaluation, preserved_rng
from tests.test_eval_runner import CharTokenizer, FakeModel, PickChoice, arc_file


class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.points = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.points.append((step, dict(metrics)))


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = FakeModel()
        self.model.layer = torch.nn.Linear(4, 1)
        self.tokenizer = CharTokenizer()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        noise = torch.randn_like(x)  # training draws from the global RNG every step, as masking does
        return self.model.layer(x + noise).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(8, 4))
        return torch.utils.data.DataLoader(data, batch_size=4)


GOLD_TEXTS = {" the Sun", " evaporation"}  # the answers of the two ARC fixture items


class EpochScorer:
    """Right on the first k examples at evaluation k (choice 0, never gold, on the rest): accuracy k / n."""

    def __init__(self):
        self.evaluations = 0

    def factory(self, model, cfg):
        self.evaluations += 1
        torch.rand(3)  # evaluation that draws random numbers must not shift training's stream
        calls = {"seen": 0}

        def score(items):
            out = []
            for _, candidates in items:
                calls["seen"] += 1
                right = calls["seen"] <= self.evaluations
                texts = [CharTokenizer().decode(c) for c in candidates]
                out.append([float((t in GOLD_TEXTS) if right else i == 0) for i, t in enumerate(texts)])
            return out

        return score


def fit(tmp_path, callbacks, epochs=3):
    logger = RecordingLogger()
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1)
    torch.manual_seed(0)
    module = TinyModule()
    trainer.fit(module)
    return logger, module


def test_callback_logs_one_point_per_epoch(tmp_path):
    path = arc_file(tmp_path, n=6)  # golds alternate 1 and 3; all items have >= 3 choices
    cfg = EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": str(path)}, subset_size=4, seed=0)
    scorer = EpochScorer()
    callback = PerEpochEvaluation(cfg, scorer_factory=scorer.factory)
    logger, _ = fit(tmp_path, [callback])
    points = [(step, m) for step, m in logger.points if any(k.startswith("eval/") for k in m)]
    assert [step for step, _ in points] == [1, 2, 3]
    for _, metrics in points:
        assert set(metrics) == {"eval/arc_challenge/acc", "eval/arc_challenge/acc_stderr",
                                "eval/arc_challenge/acc_norm", "eval/arc_challenge/acc_norm_stderr",
                                "eval/arc_challenge/n"}
        assert metrics["eval/arc_challenge/n"] == 4
    assert [m["eval/arc_challenge/acc"] for _, m in points] == [0.25, 0.5, 0.75]
    assert [e for e, _ in callback.history] == [1, 2, 3]


def test_every_n_epochs(tmp_path):
    path = arc_file(tmp_path, n=4)
    cfg = EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": str(path)}, every_n_epochs=2)
    logger, _ = fit(tmp_path, [PerEpochEvaluation(cfg, scorer_factory=lambda m, c: PickChoice(1))], epochs=4)
    assert [s for s, m in logger.points if "eval/arc_challenge/acc" in m] == [2, 4]


def test_callback_costs_no_training_state(tmp_path):
    """Same weights after training with and without the callback (its scorer draws random numbers)."""
    path = arc_file(tmp_path, n=4)
    cfg = EvalConfig(tasks=["arc_challenge"], data={"arc_challenge": str(path)})
    _, with_eval = fit(tmp_path, [PerEpochEvaluation(cfg, scorer_factory=EpochScorer().factory)])
    _, without = fit(tmp_path, [])
    assert torch.equal(with_eval.model.layer.weight, without.model.layer.weight)
    assert with_eval.model.training


def test_preserved_rng_restores_every_generator():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_callback_without_tokenizer_says_how_to_give_one(tmp_path):
    callback = PerEpochEvaluation(EvalConfig(tasks=["arc_challenge"]))
    module = TinyModule()
    module.tokenizer = None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        callback._tokenizer(pl.Trainer(logger=False), module)
