"""One `run_experiment` with recording callbacks, for the two-process FSDP2 tests (tests/test_fsdp_cpu.py).

    python -m tests.fsdp_worker OUT_DIR [--nan-at STEP] [--kill-at STEP] key=value ...

`--nan-at`: rank 1's loss of that step is NaN (the others' finite). `--kill-at`: every rank dies at once
(`os._exit`, no clean-up, like a node failure) when that step is reached.

Lightning's launcher starts the second process by running this same command again. Each rank writes
`OUT_DIR/rank<R>.json`: per-micro-batch losses, per-step gradient norms (before clipping), the plateau switch
step, the non-finite guard's step, the per-epoch evaluation history and the result (or error); rank 0 also
writes `OUT_DIR/logits.pt`, the logits of the trained *sharded* model on a fixed input (a forward on every rank).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from illada_lightning.config import load_config
from illada_lightning.experiment.config import ExperimentConfig
from illada_lightning.experiment.run import run_experiment
from illada_lightning.training.callbacks import LossPlateauLRSwitch, NonFiniteLossError, NonFiniteLossGuard

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "experiments" / "configs" / "default.yaml"


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed input for comparing logits."""
    ids = torch.randint(4, vocab_size, (2, 16), generator=torch.Generator().manual_seed(123))
    return ids


class Recorder(Callback):
    """What each rank saw and decided, stage by stage."""

    def __init__(self, nan_at: int | None = None, kill_at: int | None = None):
        self.nan_at, self.kill_at = nan_at, kill_at
        self.data: dict[str, dict] = {}
        self.logits: torch.Tensor | None = None

    def _stage(self, pl_module) -> dict:
        return self.data.setdefault(pl_module.stage, {"losses": [], "grad_norms": [], "switch_step": None,
                                                      "nonfinite_step": None, "eval": []})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.nan_at is not None and trainer.global_step == self.nan_at and trainer.global_rank == 1:
            real, self.nan_at = pl_module._loss, None  # once: a rollback then trains on

            def nan_once(b, g):  # only rank 1's loss is non-finite: the decision must still be shared
                pl_module._loss = real
                out = real(b, g)
                return replace(out, loss=out.loss * float("nan"))

            pl_module._loss = nan_once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stage(pl_module)["losses"].append([trainer.global_step, pl_module.last_loss])
        if self.kill_at is not None and trainer.global_step >= self.kill_at:
            os._exit(17)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._stage(pl_module)["grad_norms"].append([trainer.global_step, float(pl_module.grad_norm())])

    def on_train_end(self, trainer, pl_module):
        rec = self._stage(pl_module)
        switch = next((c for c in trainer.callbacks if isinstance(c, LossPlateauLRSwitch)), None)
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteLossGuard)), None)
        rec["switch_step"] = switch.switch_step if switch else None
        rec["nonfinite_step"] = guard.triggered_step if guard else None
        evaluation = next((c for c in trainer.callbacks if hasattr(c, "history")), None)
        rec["eval"] = evaluation.history if evaluation else []
        if guard is None or guard.triggered_step is None:
            with torch.no_grad():  # through the sharded model: a collective forward on every rank
                ids = probe_ids(pl_module.model_config.vocab_size).to(pl_module.device)
                self.logits = pl_module.model(ids).float().cpu()


def main(argv: list[str]) -> int:
    out, rest = Path(argv[0]), argv[1:]
    flags = {}
    while rest[:1] and rest[0].startswith("--"):
        flags[rest[0]], rest = int(rest[1]), rest[2:]
    cfg = load_config(ExperimentConfig, DEFAULT_YAML, rest)
    recorder = Recorder(flags.get("--nan-at"), flags.get("--kill-at"))
    outcome: dict = {}
    try:
        result = run_experiment(cfg, extra_callbacks=[recorder], preview=False)
        outcome["stages"] = result["stages"]
    except (NonFiniteLossError, ValueError) as exc:  # what the tests expect; recorded per rank
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({**outcome, "record": recorder.data}, default=str))
    if rank == 0 and recorder.logits is not None:
        torch.save(recorder.logits, out / "logits.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
