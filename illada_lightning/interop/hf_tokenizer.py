"""A Hugging Face tokenizer directory (`tokenizer.json` + `tokenizer_config.json`) read for a checkpoint.

The tokenizer class itself (special ids and chat template of its own) lives in the data layer
(`data/checkpoint_tokenizer.py`: SFT formatting needs it); this module checks it against the weights. The mask,
EOS and pad ids come from the checkpoint's `config.json` (what the model was trained with); BOS from
`tokenizer_config.json`'s `bos_token` (EOS when absent).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from ..data.checkpoint_tokenizer import (
    TOKENIZER_CONFIG,
    CheckpointTokenizer,
    as_checkpoint_tokenizer,
    read_json_object,
    read_rust_tokenizer,
    token_id,
)
from ..data.tokenizer import TOKENIZER_FILE as TOKENIZER_JSON
from ..data.tokenizer import Tokenizer
from ..model.config import ModelConfig
from . import HFCheckpointError


def _read(path: Path) -> RustTokenizer:
    try:
        return read_rust_tokenizer(path)
    except (FileNotFoundError, ValueError) as exc:
        raise HFCheckpointError(str(exc)) from None


def load_tokenizer_dir(directory: str | Path, cfg: ModelConfig) -> CheckpointTokenizer:
    """The checkpoint's tokenizer, checked against the weights (`cfg` from its config.json)."""
    directory = Path(directory)
    path = directory / TOKENIZER_JSON
    tok = _read(path)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise HFCheckpointError(f"{path}: vocabulary of {size} tokens does not fit the weights' {cfg.vocab_size} "
                                "embedding rows (config.json embedding_size/vocab_size)")
    for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) >= size:
            raise HFCheckpointError(f"config.json: {key}={getattr(cfg, key)} is outside the vocabulary of {path} "
                                    f"({size} tokens)")
    config_path = directory / TOKENIZER_CONFIG
    try:
        extra = read_json_object(config_path) if config_path.is_file() else {}
        bos = token_id(tok, extra["bos_token"], str(config_path), "bos_token") if extra.get("bos_token") else None
        return CheckpointTokenizer.from_config(tok, extra, str(config_path), mask_id=cfg.mask_token_id,
                                               eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                                               bos_id=cfg.eos_token_id if bos is None else bos)
    except ValueError as exc:
        raise HFCheckpointError(str(exc)) from None


def write_tokenizer_dir(tokenizer: Tokenizer, directory: Path, cfg: ModelConfig) -> None:
    """tokenizer.json and a tokenizer_config.json (special tokens, chat template) for `transformers`."""
    extra = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
             "clean_up_tokenization_spaces": False}
    as_checkpoint_tokenizer(tokenizer).save(directory, extra)
