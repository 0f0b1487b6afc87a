"""Export a trained model as a released-LLaDA-style Hugging Face checkpoint directory.

    python -m experiments.export ckpt=runs/default format=hf out=exports/default
    python -m experiments.export ckpt=runs/default/sft/model.pt format=hf out=DIR dtype=float32 max_shard_gb=2

Writes `config.json` (the LLaDA config keys), `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
The directory loads back with `il.load_checkpoint(DIR)` / `ckpt=DIR`, and in the released modelling code once
its `configuration_llada.py` and `modeling_llada.py` are placed beside it (`trust_remote_code=True`).
Keys: ckpt, format (hf), out, dtype (bfloat16 | float32 | float16), max_shard_gb, overwrite.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

from illada_lightning.checkpoint import CheckpointError, load_checkpoint
from illada_lightning.config import ConfigError, load_config
from illada_lightning.interop import HFCheckpointError
from illada_lightning.interop.llada_hf import DTYPES, export_hf_checkpoint

FORMATS = ("hf",)


@dataclass
class ExportConfig:
    ckpt: str = ""  # run directory, stage directory, model.pt, .ckpt or a checkpoint directory
    format: str = "hf"
    out: str = ""
    dtype: str = "bfloat16"  # the released checkpoints' dtype
    max_shard_gb: float = 5.0
    overwrite: bool = False

    def validate(self) -> ExportConfig:
        if not self.ckpt or not self.out:
            raise ConfigError("ckpt=PATH and out=DIR are required")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not one of {FORMATS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.max_shard_gb <= 0:
            raise ConfigError(f"max_shard_gb={self.max_shard_gb} must be positive")
        return self


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("keys: " + ", ".join(f.name for f in fields(ExportConfig)))
        return 0
    try:
        cfg = load_config(ExportConfig, None, argv).validate()
        model, tokenizer = load_checkpoint(cfg.ckpt, device="cpu")
        out = export_hf_checkpoint(model, tokenizer, cfg.out, dtype=cfg.dtype,
                                   max_shard_bytes=int(cfg.max_shard_gb * 2**30), overwrite=cfg.overwrite)
    except (ConfigError, CheckpointError, HFCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = "" if tokenizer is not None else " (no tokenizer was saved with the checkpoint: none exported)"
    print(f"exported {cfg.ckpt} -> {out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
