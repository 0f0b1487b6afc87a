"""LightningDataModules for pretraining and SFT; every batch follows the shared contract
(`input_ids` [B, L], `cu_seqlens` int32, `max_seqlen` int, `loss_mask` bool [B, L] or None).

Training loaders are `loader.ResumableLoader`s over windows sampled afresh from the token stream every epoch
(`stream.py`): deterministic for (seed, epoch) and restored mid-epoch by Lightning on resume. Validation loaders give the same batches on every pass, without random-length splits
(the validation loss is measured on full rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np

from illada_lightning.data.config import DataConfig, SFTDataConfig
from illada_lightning.data.corpus import load_tokenized_documents
from illada_lightning.data.loader import EpochBatchSampler, EvalLoader, ResumableLoader, seeded_generator
from illada_lightning.data.packing import collate_packed_rows
from illada_lightning.data.sft import (
    collate_response_only,
    example_stream_documents,
    load_sft_examples,
    response_only_rows,
)
from illada_lightning.data.stream import (
    TokenStream,
    n_fixed_windows,
    n_train_windows,
    train_window_starts,
    window_rows,
)

log = logging.getLogger(__name__)


@dataclass
class WindowBatchMaker:
    """A batch of stream windows (stream.py), picklable. Training: the windows of (seed, epoch), a new cut every
    epoch, with the random-length split seeded by (seed, epoch, batch index). Validation (`train` False): the
    fixed windows, whole. `isolate_documents` False makes a window one attention segment (SFT `window`)."""

    stream: TokenStream
    window: int
    p_split: float
    seed: int
    pad_id: int
    train: bool = True
    isolate_documents: bool = True

    def __len__(self) -> int:
        n = self.stream.n_tokens
        return n_train_windows(n, self.window) if self.train else n_fixed_windows(n, self.window)

    def __call__(self, items: np.ndarray, epoch: int, index: int) -> dict:
        if self.train:
            starts = train_window_starts(items, self.seed, epoch, self.stream.n_tokens, self.window)
        else:
            starts = np.asarray(items, dtype=np.int64) * self.window
        rows = window_rows(self.stream, starts, self.window, pad_id=self.pad_id, wrap=self.train,
                           isolate_documents=self.isolate_documents)
        p_split = self.p_split if self.train else 0.0
        generator = seeded_generator(self.seed, epoch, index) if p_split > 0 else None
        return collate_packed_rows(rows, np.arange(len(rows)), p_split=p_split, generator=generator)


@dataclass
class ResponseOnlyBatchMaker:
    rows: list[np.ndarray]
    prompt_lens: np.ndarray
    eos_id: int

    def __call__(self, items: np.ndarray, epoch: int, index: int) -> dict:
        return collate_response_only([self.rows[i] for i in items], self.prompt_lens[items], self.eos_id)


class _BaseDataModule(L.LightningDataModule):
    def __init__(self, tokenizer, max_seq_len: int, batch_size: int, seed: int, num_workers: int):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokenizer, self.max_seq_len, self.batch_size = tokenizer, int(max_seq_len), batch_size
        self.seed, self.num_workers = seed, num_workers
        self._train_maker = self._val_maker = None
        self._n_train = self._n_val = 0

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        if self._train_maker is None:
            self.setup("fit")
        rank, world = self._rank()
        sampler = EpochBatchSampler(self._n_train, self.batch_size, seed=self.seed, shuffle=True, rank=rank,
                                    world_size=world)
        return ResumableLoader(sampler, self._train_maker, self.num_workers)

    def val_dataloader(self) -> EvalLoader | list:
        if self._train_maker is None:
            self.setup("fit")
        if self._val_maker is None:
            return []
        rank, world = self._rank()
        return EvalLoader(self._n_val, self.batch_size, self._val_maker, self.num_workers, rank, world)


class PretrainDataModule(_BaseDataModule):
    """Windows of `max_seq_len` sampled from the corpus stream (data_cfg.max_seq_len wins when set); documents
    stay isolated (iLLaDA §2.1)."""

    def __init__(self, data_cfg: DataConfig, tokenizer, max_seq_len: int, batch_size: int, seed: int = 0):
        data_cfg.validate()
        super().__init__(tokenizer, data_cfg.max_seq_len or max_seq_len, batch_size, seed, data_cfg.num_workers)
        self.cfg = data_cfg

    def _stream(self, files, split: str) -> TokenStream:
        docs = self._tokenized(files, split)
        stream = TokenStream.from_documents(docs, self.tokenizer.eos_id)
        log.info("%s: %d documents, %d tokens, windows of %d", split, len(docs), stream.n_tokens, self.max_seq_len)
        return stream

    def _tokenized(self, files, split: str) -> list[np.ndarray]:
        c = self.cfg
        return load_tokenized_documents(files, self.tokenizer, fmt=c.format, text_field=c.text_field,
                                        text_unit=c.text_unit, hub_name=c.hub_name, hub_split=split,
                                        cache_dir=c.cache_dir)

    def _maker(self, stream: TokenStream, train: bool) -> WindowBatchMaker:
        return WindowBatchMaker(stream, self.max_seq_len, self.cfg.p_split, self.seed, self.tokenizer.pad_id, train)

    def prepare_data(self) -> None:
        """Tokenise into the cache once (Lightning runs this on one process; `setup` then reads the cache)."""
        self._tokenized(self.cfg.train_files, "train")
        if self.cfg.val_files or self.cfg.hub_name is not None:
            self._tokenized(self.cfg.val_files, "validation")

    def setup(self, stage: str | None = None) -> None:
        if self._train_maker is not None:
            return
        self.train_stream = self._stream(self.cfg.train_files, "train")
        self._train_maker = self._maker(self.train_stream, train=True)
        self._n_train = len(self._train_maker)
        if self.cfg.val_files or self.cfg.hub_name is not None:
            self._val_maker = self._maker(self._stream(self.cfg.val_files, "validation"), train=False)
            self._n_val = len(self._val_maker)


class SFTDataModule(_BaseDataModule):
    """Instruction data in iLLaDA's `whole_window` layout (attention across examples in a window, or per
    example with `attention=per_example`) or LLaDA's `response_only` layout (see sft.py)."""

    def __init__(self, sft_cfg: SFTDataConfig, tokenizer, max_seq_len: int, batch_size: int, seed: int = 0):
        sft_cfg.validate()
        super().__init__(tokenizer, sft_cfg.max_seq_len or max_seq_len, batch_size, seed, sft_cfg.num_workers)
        self.cfg = sft_cfg

    def _maker(self, files, train: bool):
        c, tok = self.cfg, self.tokenizer
        examples = self._examples(files)
        if c.masking == "whole_window":
            stream = TokenStream.from_documents(example_stream_documents(examples, tok.eos_id))
            maker = WindowBatchMaker(stream, self.max_seq_len, c.p_split, self.seed, tok.pad_id, train,
                                     isolate_documents=c.attention == "per_example")
            return maker, len(maker)
        rows, prompt_lens = response_only_rows(examples, self.max_seq_len, tok.eos_id)
        return ResponseOnlyBatchMaker(rows, prompt_lens, tok.eos_id), len(rows)

    def _examples(self, files):
        c = self.cfg
        # A dialogue is split into n pairs only in the LLaDA layout; whole_window keeps it as one example.
        split_turns = c.multi_turn_split and c.masking == "response_only"
        return load_sft_examples(files, self.tokenizer, multi_turn_split=split_turns, cache_dir=c.cache_dir)

    def prepare_data(self) -> None:
        """Validate and tokenise into the cache once (Lightning runs this on one process)."""
        for files in (self.cfg.train_files, self.cfg.val_files):
            if files:
                self._examples(files)

    def setup(self, stage: str | None = None) -> None:
        if self._train_maker is not None:
            return
        self._train_maker, self._n_train = self._maker(self.cfg.train_files, train=True)
        if self.cfg.val_files:
            self._val_maker, self._n_val = self._maker(self.cfg.val_files, train=False)
