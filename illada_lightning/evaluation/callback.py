"""`PerEpochEvaluation`: run evaluation tasks at the end of every N training epochs and log
`eval/<task>/<metric>` against the epoch, so the SFT-epoch curve of iLLaDA Fig. 1 appears in the MLflow UI.

Distributed training - sharded and gathered, on every rank:
- every rank evaluates its shard (examples i, i + world_size, ...) of the same fixed subset, and the metrics
  are gathered with torchmetrics' all-reduce (`metrics.accuracy_with_stderr(sync=True)`), so the numbers
  equal a single-process evaluation of the whole subset and the work is split world_size ways;
- under DDP each rank runs its local replica (`pl_module.model`, not the DDP wrapper: no collectives);
- under FSDP the parameters are sharded and a forward needs every rank in lock-step, which evaluation
  cannot promise (generation stops early per prompt, confidence scoring takes one forward per candidate
  token). So the full weights are gathered once per evaluation (one collective, every rank) into a plain
  unsharded copy on each rank, which then evaluates its shard with no collectives. This costs one extra
  copy of the weights in device memory while evaluating; it is freed afterwards.
Rank 0 alone would deadlock under FSDP and waste the other ranks under DDP, hence this choice.

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


def _is_fsdp(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def unsharded_copy(fsdp_root: torch.nn.Module, model_config, device, prefix: str = "model.") -> torch.nn.Module:
    """A plain `MaskPredictor` with the full weights of the FSDP-wrapped model under `fsdp_root` (whose state
    dict keys start with `prefix`), on every rank. A collective: every rank must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from illada_lightning.model.transformer import MaskPredictor

    with FSDP.state_dict_type(fsdp_root, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
        state = fsdp_root.state_dict()
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    copy = MaskPredictor(model_config)
    copy.load_state_dict(state)
    return copy.to(device)


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
        tokenizer = self._tokenizer(trainer, pl_module)
        with preserved_rng():
            if _is_fsdp(trainer):  # Lightning wraps the LightningModule: its `model` is under "model."
                model = unsharded_copy(trainer.strategy.model, pl_module.model.config, pl_module.device)
            else:
                model = pl_module.model
            scorer = self.scorer_factory(model, self.cfg) if self.scorer_factory else None
            generator = self.generator_factory(model, tokenizer, self.cfg) if self.generator_factory else None
            results = evaluate(model, tokenizer, self.cfg.tasks, self.cfg, scorer=scorer, generator=generator,
                               subset_size=self.cfg.subset_size, rank=trainer.global_rank,
                               world_size=trainer.world_size)
        return {f"eval/{task}/{name}": float(value) for task, values in results.items()
                for name, value in values.items() if name != "seconds"}
