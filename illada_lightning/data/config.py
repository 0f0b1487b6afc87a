"""Typed configs for the tokenizer, the pretraining corpus and the SFT data.

Relative file paths are resolved against the working directory first, then against the repository root
(see `corpus.resolve_data_path`), so the shipped defaults work from any directory inside a clone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_UNITS = ("auto", "paragraph", "file", "wikitext")
SFT_MASKING = ("whole_window", "response_only")
SFT_ATTENTION = ("window", "per_example")


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _check_p_split(section: str, p_split: float) -> None:
    _need(0.0 <= p_split <= 1.0, f"{section}.p_split", f"must be a probability in [0, 1], got {p_split}")


def _check_max_seq_len(section: str, max_seq_len: int | None) -> None:
    _need(max_seq_len is None or max_seq_len >= 2, f"{section}.max_seq_len",
          f"must be None (use model.max_seq_len) or >= 2, got {max_seq_len}")


@dataclass
class TokenizerConfig:
    path: str | None = None  # a saved tokenizer.json (or its directory); None = train one
    vocab_size: int = 4096  # for training; includes the 9 special tokens
    train_files: list[str] = field(default_factory=list)  # [] = the pretraining corpus files
    split_digits: bool = True  # one token per digit (arithmetic is learnt digit by digit)

    def validate(self) -> TokenizerConfig:
        _need(self.vocab_size >= 300, "tokenizer.vocab_size",
              f"must be >= 300 (256 byte symbols + 9 special tokens + merges), got {self.vocab_size}")
        return self


@dataclass
class DataConfig:
    """Pretraining corpus: documents packed into rows of `max_seq_len` (iLLaDA §2.1)."""

    train_files: list[str] = field(default_factory=lambda: ["data/corpus/train.txt"])
    val_files: list[str] = field(default_factory=lambda: ["data/corpus/valid.txt"])
    format: str = "auto"  # auto (by extension) | text | jsonl | parquet
    text_field: str = "text"  # the record field holding a document (jsonl, parquet, hub)
    text_unit: str = "auto"  # text files: auto | paragraph | file | wikitext (see corpus.split_text_documents)
    hub_name: str | None = None  # a `datasets` hub name; replaces the files (online use only)
    # Prepared corpora (`python -m experiments.prepare_data`): token shards on disk, read by window. When unset,
    # the files / hub data set are prepared once into cache_dir (a no-op afterwards) and read the same way.
    train_corpus: str | None = None
    val_corpus: str | None = None
    streaming: bool = False  # train from `datasets` streaming (hub_name, or jsonl/parquet train_files), no preparation
    num_proc: int = 1  # processes tokenising when files are prepared
    max_seq_len: int | None = None  # None = model.max_seq_len
    p_split: float = 0.3  # random-length training: probability of splitting a row in two (iLLaDA §2.1)
    cache_dir: str = ".cache/illada"
    num_workers: int = 0

    def validate(self) -> DataConfig:
        _need(self.format in FORMATS, "data.format", f"{self.format!r} is not one of {FORMATS}")
        _need(self.text_unit in TEXT_UNITS, "data.text_unit", f"{self.text_unit!r} is not one of {TEXT_UNITS}")
        _need(bool(self.train_files) or self.hub_name is not None or self.train_corpus is not None,
              "data.train_files", "is empty and neither data.hub_name nor data.train_corpus is set")
        _need(not (self.streaming and self.train_corpus), "data.streaming",
              "reads hub_name or train_files as a stream; it cannot be combined with data.train_corpus")
        _need(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        _need(bool(self.text_field), "data.text_field", "must be a non-empty field name")
        _check_max_seq_len("data", self.max_seq_len)
        _check_p_split("data", self.p_split)
        _need(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        return self


@dataclass
class SFTDataConfig:
    """Instruction data: `prompt`/`response` or chat `messages` records in jsonl files."""

    train_files: list[str] = field(default_factory=lambda: ["data/instruct/train.jsonl"])
    val_files: list[str] = field(default_factory=lambda: ["data/instruct/valid.jsonl"])
    masking: str = "whole_window"  # iLLaDA §2.2 | response_only (LLaDA §2.3 baseline)
    # whole_window only: `window` lets attention run across examples inside a training window (iLLaDA §2.2, one
    # continuous instruction corpus: the model sees tokens after an EOS, as in variable-length block generation,
    # §2.3); `per_example` makes every example its own cu_seqlens segment (the ablation).
    attention: str = "window"
    p_split: float = 0.3  # random-length training, whole_window only
    max_seq_len: int | None = None  # None = model.max_seq_len
    multi_turn_split: bool = True  # response_only: an n-turn dialogue gives n pairs (LLaDA B.1)
    cache_dir: str = ".cache/illada"
    num_workers: int = 0

    def validate(self) -> SFTDataConfig:
        _need(self.masking in SFT_MASKING, "sft.masking", f"{self.masking!r} is not one of {SFT_MASKING}")
        _need(self.attention in SFT_ATTENTION, "sft.attention",
              f"{self.attention!r} is not one of {SFT_ATTENTION}")
        _need(bool(self.train_files), "sft.train_files", "must name at least one jsonl file")
        _check_max_seq_len("sft", self.max_seq_len)
        _check_p_split("sft", self.p_split)
        _need(self.num_workers >= 0, "sft.num_workers", f"must be >= 0, got {self.num_workers}")
        return self
