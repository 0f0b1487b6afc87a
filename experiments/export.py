"""Export a trained model as a released-LLaDA-style Hugging Face checkpoint directory, or as this project's
one-file format.

    python -m experiments.export ckpt=runs/default format=hf out=exports/default
    python -m experiments.export ckpt=runs/default/sft/model.pt format=hf out=DIR dtype=float32 max_shard_gb=2
    python -m experiments.export ckpt=runs/lora/sft/checkpoints/last.ckpt format=pt out=DIR

`format=hf` writes `config.json` (the LLaDA config keys), `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
The directory loads back with `il.load_checkpoint(DIR)` / `ckpt=DIR`, and in the released modelling code once
its `configuration_llada.py` and `modeling_llada.py` are placed beside it (`trust_remote_code=True`).
`format=pt` writes `DIR/model.pt` (weights, model config and tokenizer in one file, as training exports).
A LoRA SFT checkpoint (`sft.lora.rank > 0`) is written with its adapters merged into the base weights, under
the base names, in either format.
Keys: ckpt, format (hf | pt), out, dtype (bfloat16 | float32 | float16; default: bfloat16 for hf, the
checkpoint's own for pt), max_shard_gb (hf), overwrite.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from illada_lightning.checkpoint import EXPORT_FILE, CheckpointError, export_model, load_checkpoint
from illada_lightning.config import ConfigError, load_config
from illada_lightning.interop import HFCheckpointError
from illada_lightning.interop.llada_hf import DTYPES, export_hf_checkpoint

FORMATS = ("hf", "pt")


@dataclass
class ExportConfig:
    ckpt: str = ""  # run directory, stage directory, model.pt, .ckpt or a checkpoint directory
    format: str = "hf"
    out: str = ""
    dtype: str | None = None  # null: bfloat16 (the released checkpoints' dtype) for hf, the checkpoint's for pt
    max_shard_gb: float = 5.0
    overwrite: bool = False

    def validate(self) -> ExportConfig:
        if not self.ckpt or not self.out:
            raise ConfigError("ckpt=PATH and out=DIR are required")
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not one of {FORMATS}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.max_shard_gb <= 0:
            raise ConfigError(f"max_shard_gb={self.max_shard_gb} must be positive")
        return self


def export_project(model, tokenizer, cfg: ExportConfig) -> Path:
    """`<out>/model.pt`: the weights (in `dtype`, if given), model config and tokenizer in one file."""
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise CheckpointError(f"out={out} exists and is not empty (pass overwrite=true to replace it)")
    state = {k: v.detach().to(DTYPES[cfg.dtype]) if cfg.dtype else v.detach() for k, v in model.state_dict().items()}
    export_model(out / EXPORT_FILE, model.config, state, tokenizer.to_str() if tokenizer is not None else None,
                 {"exported_from": str(cfg.ckpt)})
    return out


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("keys: " + ", ".join(f.name for f in fields(ExportConfig)))
        return 0
    try:
        cfg = load_config(ExportConfig, None, argv).validate()
        model, tokenizer = load_checkpoint(cfg.ckpt, device="cpu")  # LoRA adapters merged
        if cfg.format == "pt":
            out = export_project(model, tokenizer, cfg)
        else:
            out = export_hf_checkpoint(model, tokenizer, cfg.out, dtype=cfg.dtype or "bfloat16",
                                       max_shard_bytes=int(cfg.max_shard_gb * 2**30), overwrite=cfg.overwrite)
    except (ConfigError, CheckpointError, HFCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = "" if tokenizer is not None else " (no tokenizer was saved with the checkpoint: none exported)"
    print(f"exported {cfg.ckpt} -> {out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
