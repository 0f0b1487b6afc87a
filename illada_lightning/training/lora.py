"""LoRA SFT in the training stage: the checks before training, the precision, the logged counts, resume.

The adapters themselves are peft's (model/lora.py). `DiffusionLMModule.configure_model` adds them before
FSDP2 shards the model, so they are sharded with their blocks, and `weight_decay_groups` hands AdamW the
trainable parameters only (the adapters; decayed like every matrix). Checkpoints hold the frozen base and the
adapters under the names of model/lora.py, and say so (`checkpoint["illada"]["lora"]`); the stage's exported
`model.pt` holds the merged weights (`checkpoint.full_model_state`), so evaluate / generate / init_from read
a plain model.

`precision=bf16-true` keeps the frozen base in bf16 and the adapters (and their AdamW state) in fp32
(`FrozenBaseHalfPrecision`): an 8B base is 15 GiB, and fp32 adapters do not round small updates away.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from lightning.pytorch.plugins.precision import HalfPrecision

from ..model.build import build_model
from ..model.lora import adapted_parameter_counts, check_targets, to_storage_dtype
from ..model.lora_config import LoraConfig
from .config import TrainingConfig

log = logging.getLogger(__name__)


class FrozenBaseHalfPrecision(HalfPrecision):
    """Lightning's `bf16-true`, except that the trainable adapters stay float32 (Lightning would cast them)."""

    def __init__(self):
        super().__init__("bf16-true")

    def convert_module(self, module):
        return to_storage_dtype(module, self._desired_input_dtype)


def trainer_precision(precision: str, lora: LoraConfig | None) -> tuple[str | None, list]:
    """(Trainer `precision`, extra precision plugins): bf16-true with adapters is `FrozenBaseHalfPrecision`."""
    if lora is not None and lora.enabled and precision == "bf16-true":
        return None, [FrozenBaseHalfPrecision()]
    return precision, []


def stage_lora(cfg: TrainingConfig, stage: str) -> LoraConfig | None:
    """The adapters a stage trains (SFT only; None: full-parameter training)."""
    return cfg.sft.lora if stage == "sft" and cfg.sft.lora.enabled else None


def check_lora(cfg: TrainingConfig) -> None:
    """Before training: the targets match the same projections in every block (model/lora.check_targets)."""
    lora = stage_lora(cfg, "sft")
    if lora is None or cfg.stage not in ("sft", "all"):
        return
    check_targets(build_model(cfg.model, device="meta"), lora)
    counts = adapted_parameter_counts(cfg.model, lora)
    log.info("sft: LoRA rank %d on %s trains %d of %d parameters (%.2f%%)", lora.rank, ",".join(lora.targets),
             counts["trainable_params"], counts["total_params"],
             100 * counts["trainable_params"] / counts["total_params"])


def lora_run_params(cfg: TrainingConfig, stage: str) -> dict[str, int]:
    """MLflow params `lora.trainable_params` and `lora.total_params` of a LoRA stage (empty otherwise)."""
    lora = stage_lora(cfg, stage)
    return {} if lora is None else {f"lora.{k}": v for k, v in adapted_parameter_counts(cfg.model, lora).items()}


def check_resumed_lora(checkpoint: dict, lora: LoraConfig) -> None:
    """Refuse to resume a checkpoint whose adapters (or their absence) differ from this run's sft.lora."""
    saved = (checkpoint.get("illada") or {}).get("lora")
    wanted = asdict(lora) if lora.enabled else None
    if saved != wanted:
        raise ValueError(f"the checkpoint was trained with sft.lora={saved or 'off'}, this run asks for "
                         f"sft.lora={wanted or 'off'}; resume with the same sft.lora settings")
