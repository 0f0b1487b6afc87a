"""`PerEpochEvaluation`: run evaluation tasks at the end of every N training epochs and log
`eval/<task>/<metric>` against the epoch, so the SFT-epoch curve of iLLaDA Fig. 1 appears in the MLflow UI.

Distributed training:
- under DDP every rank evaluates its shard (examples i, i + world_size, ...) of the same fixed subset with
  its local replica (`pl_module.model`, not the DDP wrapper: no collectives), and the metrics are gathered
  with torchmetrics' all-reduce (`metrics.accuracy_with_stderr(sync=True)`), so the numbers equal a
  single-process evaluation of the whole subset and the work is split world_size ways;
- under FSDP2 (`strategy=fsdp`) a forward through the sharded model needs every rank in lock-step, which
  evaluation cannot promise (generation stops early per prompt, confidence scoring takes one forward per
  candidate token). So the shards are gathered once, to rank 0's host memory only
  (`checkpoint.full_model_state`); rank 0 evaluates the whole subset on an unsharded copy, the other ranks
  wait, and the metrics are broadcast. No rank but 0 ever holds a full copy; the copy is freed afterwards.
  The numbers are those of a single-process evaluation of the same weights by construction.

No training state is touched: the model goes to eval mode under no_grad and back to train mode, and the
CPU and CUDA random states (torch, Python, NumPy) are saved before and restored after, so a run with the
callback draws the same masks and batches as one without it.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import replace

import lightning.pytorch as pl
import numpy as np
import torch

from ..checkpoint import full_model_state
from ..model.transformer import MaskPredictor
from ..training.strategy import is_sharded
from .config import EvalConfig
from .runner import evaluate

log = logging.getLogger(__name__)


@contextmanager
def preserved_rng():
    """Save and restore every random state training draws from."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _unsharded_on_rank_zero(trainer: pl.Trainer, pl_module) -> torch.nn.Module | None:
    """A plain `MaskPredictor` with the full weights on rank 0 (None elsewhere). A collective."""
    state = full_model_state(trainer, pl_module)
    if state is None:
        return None
    copy = MaskPredictor(pl_module.model.config)
    copy.load_state_dict(state)
    return copy.to(pl_module.device)


class PerEpochEvaluation(pl.Callback):
    """Evaluate `cfg.tasks` on a fixed subset (`cfg.subset_size`) every `cfg.every_n_epochs` epochs.

    Logs `eval/<task>/<metric>` with step = the number of epochs completed (1, 2, ...) to every logger of
    the trainer (MLflow in `experiments.run`). `tokenizer`: else `pl_module.tokenizer` or
    `trainer.datamodule.tokenizer`. `scorer_factory(model, cfg)` / `generator_factory(model, tokenizer, cfg)`
    replace the model calls (tests). `history` keeps `(epoch, metrics)` for inspection.
    """

    def __init__(self, cfg: EvalConfig, tokenizer=None, *, scorer_factory=None, generator_factory=None):
        super().__init__()
        self.cfg = replace(cfg).validate()
        self.tokenizer = tokenizer
        self.scorer_factory = scorer_factory
        self.generator_factory = generator_factory
        self.history: list[tuple[int, dict[str, float]]] = []

    def _tokenizer(self, trainer, pl_module):
        for source in (self, pl_module, getattr(trainer, "datamodule", None)):
            tok = getattr(source, "tokenizer", None)
            if tok is not None:
                return tok
        raise ValueError("PerEpochEvaluation needs a tokenizer: pass tokenizer=..., or give the LightningModule "
                         "or the datamodule a `tokenizer` attribute")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.cfg.every_n_epochs != 0 or trainer.sanity_checking:
            return
        metrics = self.run(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=epoch)
        self.history.append((epoch, metrics))
        if trainer.is_global_zero:
            log.info("epoch %d evaluation: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        with preserved_rng():
            if is_sharded(pl_module.model):
                model = _unsharded_on_rank_zero(trainer, pl_module)
                metrics = self._evaluate(model, trainer, pl_module, 0, 1) if model is not None else None
                del model
                return trainer.strategy.broadcast(metrics, src=0)
            return self._evaluate(pl_module.model, trainer, pl_module, trainer.global_rank, trainer.world_size)

    def _evaluate(self, model, trainer, pl_module, rank: int, world_size: int) -> dict[str, float]:
        tokenizer = self._tokenizer(trainer, pl_module)
        scorer = self.scorer_factory(model, self.cfg) if self.scorer_factory else None
        generator = self.generator_factory(model, tokenizer, self.cfg) if self.generator_factory else None
        results = evaluate(model, tokenizer, self.cfg.tasks, self.cfg, scorer=scorer, generator=generator,
                           subset_size=self.cfg.subset_size, rank=rank, world_size=world_size)
        return {f"eval/{task}/{name}": float(value) for task, values in results.items()
                for name, value in values.items() if name != "seconds"}
