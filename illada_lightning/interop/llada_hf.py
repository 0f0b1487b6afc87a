"""Released LLaDA checkpoints in and out: a Hugging Face directory <-> `(MaskPredictor, tokenizer)`.

A directory holds `config.json` (the LLaDA config, `llada_config.py`), safetensors weights (one file or shards
with `model.safetensors.index.json`, `llada_weights.py`) and `tokenizer.json` + `tokenizer_config.json`
(`hf_tokenizer.py`). Loading builds the model on the meta device and assigns each weight read from the
memory-mapped files straight in the target dtype (bf16 on GPU): no full float32 copy of an 8B model ever
exists in host memory. `checkpoint/model.py` dispatches here for such a directory, so `load_checkpoint`,
`experiments.evaluate ckpt=`, `experiments.generate ckpt=` and `init_from=` accept it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..data.checkpoint_tokenizer import CheckpointTokenizer, read_json_object
from ..data.tokenizer import Tokenizer
from ..model.config import ModelConfig
from ..model.transformer import MaskPredictor
from . import HFCheckpointError
from .hf_tokenizer import TOKENIZER_JSON, load_tokenizer_dir, write_tokenizer_dir
from .llada_config import llada_config_from_model, model_config_from_llada
from .llada_weights import (
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsShards,
    check_weights,
    iter_state,
    split_state,
    write_shards,
)

CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_checkpoint(path: str | Path) -> bool:
    """A directory with `config.json` and safetensors weights (what this module reads)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG_FILE).is_file() and ((p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file())


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        raw = read_json_object(path)
    except ValueError as exc:
        raise HFCheckpointError(str(exc)) from None
    return model_config_from_llada(raw, str(path))


def _default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPU (the released weights' dtype, half the memory); float32 on CPU, where bf16 matmuls are slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_hf_checkpoint(path: str | Path, device=None, dtype: torch.dtype | None = None):
    """`(model in eval mode, tokenizer)`; weights read lazily, one tensor at a time, in `dtype` on `device`."""
    directory = Path(path).expanduser()
    cfg = read_config(directory)
    tokenizer = read_hf_tokenizer(directory)
    shards = SafetensorsShards(directory)
    check_weights(shards, cfg)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = MaskPredictor(cfg)  # no memory, no random init
    state = dict(iter_state(shards, cfg, device, dtype or _default_dtype(device)))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), tokenizer


def read_hf_tokenizer(path: str | Path) -> CheckpointTokenizer | None:
    """The directory's tokenizer with the special ids of its config.json (None without tokenizer.json)."""
    directory = Path(path).expanduser()
    return load_tokenizer_dir(directory, read_config(directory)) if (directory / TOKENIZER_JSON).is_file() else None


def read_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], None, Path]:
    """`read_model_checkpoint`'s answer for a directory: (config, state in the stored dtype on CPU, no
    tokenizer json - its special ids live in config.json, see `load_hf_checkpoint` - , the directory)."""
    directory = Path(path).expanduser()
    cfg = read_config(directory)
    shards = SafetensorsShards(directory)
    check_weights(shards, cfg)
    return cfg, dict(iter_state(shards, cfg, torch.device("cpu"), None)), None, directory


def read_hf_layout(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and a meta-device state dict (our names and shapes, no data) of a checked directory: what
    init_from's compatibility check needs, without reading a weight."""
    directory = Path(path).expanduser()
    cfg = read_config(directory)
    check_weights(SafetensorsShards(directory), cfg)
    with torch.device("meta"):
        return cfg, MaskPredictor(cfg).state_dict()


@torch.no_grad()
def copy_hf_weights(model: MaskPredictor, path: str | Path) -> None:
    """Copy the directory's weights into `model` one tensor at a time (init_from): host memory holds the model
    and one tensor being read, never a second full copy of an 8B model."""
    directory = Path(path).expanduser()
    cfg = read_config(directory)
    shards = SafetensorsShards(directory)
    check_weights(shards, cfg)
    own = model.state_dict()
    for name, tensor in iter_state(shards, cfg, torch.device("cpu"), None):
        own[name].copy_(tensor)


def export_hf_checkpoint(model: MaskPredictor, tokenizer: Tokenizer | None, out: str | Path, *,
                         dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a LLaDA checkpoint directory; returns the directory.

    Written into `<out>.tmp` and renamed at the end, so a failure never leaves a half-written `out`; an
    existing non-empty `out` is refused unless `overwrite`."""
    out = Path(out).expanduser()
    if dtype not in DTYPES:
        raise HFCheckpointError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFCheckpointError(f"out={out} exists and is not empty (pass overwrite=true to replace it)")
    cfg = model.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFCheckpointError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                                f"{cfg.vocab_size} embedding rows")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(DTYPES[dtype]) for k, v in model.state_dict().items()}
    write_shards(split_state(state, cfg), tmp, max_shard_bytes)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    (tmp / CONFIG_FILE).write_text(json.dumps(llada_config_from_model(cfg, vocab, dtype), indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_dir(tokenizer, tmp, cfg)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
