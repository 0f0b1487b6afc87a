"""Data pipeline: tokenizer, corpora, packing, SFT layouts, resumable loaders, synthetic instruction task."""

from illada_lightning.data.checkpoint_tokenizer import CheckpointTokenizer, load_tokenizer
from illada_lightning.data.config import DataConfig, SFTDataConfig, TokenizerConfig
from illada_lightning.data.tokenizer import (
    Tokenizer,
    build_tokenizer,
    check_tokenizer_compatible,
    train_tokenizer,
)

__all__ = [
    "DataConfig",
    "SFTDataConfig",
    "TokenizerConfig",
    "Tokenizer",
    "CheckpointTokenizer",
    "load_tokenizer",
    "build_tokenizer",
    "check_tokenizer_compatible",
    "train_tokenizer",
    "PretrainDataModule",
    "SFTDataModule",
]


def __getattr__(name):  # the Lightning modules import lightning: load them only when asked for
    if name in ("PretrainDataModule", "SFTDataModule"):
        from illada_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(name)
