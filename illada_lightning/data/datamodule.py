"""LightningDataModules for pretraining and SFT; every batch follows the shared contract
(`input_ids` [B, L], `cu_seqlens` int32, `max_seqlen` int, `loss_mask` bool [B, L] or None).

Training loaders are `loader.ResumableLoader`s: deterministic for (seed, epoch) and restored mid-epoch by
Lightning on resume. Validation loaders give the same batches on every pass, without random-length splits
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
from illada_lightning.data.packing import PackedRows, collate_packed_rows, pack_documents
from illada_lightning.data.sft import (
    collate_response_only,
    example_stream_documents,
    load_sft_examples,
    response_only_rows,
)

log = logging.getLogger(__name__)


@dataclass
class PackedBatchMaker:
    """Batch of packed rows with a random-length split seeded by (seed, epoch, batch index); picklable."""

    rows: PackedRows
    p_split: float
    seed: int

    def __call__(self, items: np.ndarray, epoch: int, index: int) -> dict:
        generator = seeded_generator(self.seed, epoch, index) if self.p_split > 0 else None
        return collate_packed_rows(self.rows, items, p_split=self.p_split, generator=generator)


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
    """Corpus documents packed into rows of `max_seq_len` (data_cfg.max_seq_len wins when set)."""

    def __init__(self, data_cfg: DataConfig, tokenizer, max_seq_len: int, batch_size: int, seed: int = 0):
        data_cfg.validate()
        super().__init__(tokenizer, data_cfg.max_seq_len or max_seq_len, batch_size, seed, data_cfg.num_workers)
        self.cfg = data_cfg

    def _packed(self, files, split: str) -> PackedRows:
        docs = self._tokenized(files, split)
        rows = pack_documents(docs, self.max_seq_len, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        log.info("%s: %d documents, %d tokens -> %d rows of %d", split, len(docs), int(rows.n_real.sum()),
                 len(rows), self.max_seq_len)
        return rows

    def _tokenized(self, files, split: str) -> list[np.ndarray]:
        c = self.cfg
        return load_tokenized_documents(files, self.tokenizer, fmt=c.format, text_field=c.text_field,
                                        text_unit=c.text_unit, hub_name=c.hub_name, hub_split=split,
                                        cache_dir=c.cache_dir)

    def prepare_data(self) -> None:
        """Tokenise into the cache once (Lightning runs this on one process; `setup` then reads the cache)."""
        self._tokenized(self.cfg.train_files, "train")
        if self.cfg.val_files or self.cfg.hub_name is not None:
            self._tokenized(self.cfg.val_files, "validation")

    def setup(self, stage: str | None = None) -> None:
        if self._train_maker is not None:
            return
        self.train_rows = self._packed(self.cfg.train_files, "train")
        self._train_maker = PackedBatchMaker(self.train_rows, self.cfg.p_split, self.seed)
        self._n_train = len(self.train_rows)
        if self.cfg.val_files or self.cfg.hub_name is not None:
            self.val_rows = self._packed(self.cfg.val_files, "validation")
            self._val_maker, self._n_val = PackedBatchMaker(self.val_rows, 0.0, self.seed), len(self.val_rows)


class SFTDataModule(_BaseDataModule):
    """Instruction data in iLLaDA's `whole_window` layout or LLaDA's `response_only` layout (see sft.py)."""

    def __init__(self, sft_cfg: SFTDataConfig, tokenizer, max_seq_len: int, batch_size: int, seed: int = 0):
        sft_cfg.validate()
        super().__init__(tokenizer, sft_cfg.max_seq_len or max_seq_len, batch_size, seed, sft_cfg.num_workers)
        self.cfg = sft_cfg

    def _maker(self, files, p_split: float):
        c, tok = self.cfg, self.tokenizer
        examples = self._examples(files)
        if c.masking == "whole_window":
            rows = pack_documents(example_stream_documents(examples, tok.eos_id), self.max_seq_len,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, append_eos=False)
            return PackedBatchMaker(rows, p_split, self.seed), len(rows)
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
        self._train_maker, self._n_train = self._maker(self.cfg.train_files, self.cfg.p_split)
        if self.cfg.val_files:
            self._val_maker, self._n_val = self._maker(self.cfg.val_files, 0.0)
