"""LightningDataModules for pretraining and SFT; every batch follows the shared contract
(`input_ids` [B, L], `cu_seqlens` int32, `max_seqlen` int, `loss_mask` bool [B, L] or None).

Training loaders are `loader.ResumableLoader`s over windows sampled afresh from the token stream every epoch
(`stream.py`): deterministic for (seed, epoch) and restored mid-epoch by Lightning on resume, also with another
number of workers. Validation loaders give the same batches on every pass, without random-length splits (the
validation loss is measured on full rows).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np

from illada_lightning.data.config import DataConfig, SFTDataConfig
from illada_lightning.data.corpus import (
    DataFileError,
    cache_key,
    check_data_file,
    detect_format,
    resolve_data_path,
)
from illada_lightning.data.loader import EpochBatchSampler, EvalLoader, ResumableLoader, seeded_generator
from illada_lightning.data.packing import collate_packed_rows
from illada_lightning.data.prepare import prepare_corpus
from illada_lightning.data.prepared import file_sources, open_prepared
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
from illada_lightning.data.streaming import StreamingLoader, stream_documents

STREAM_BUILDERS = {"jsonl": "json", "parquet": "parquet"}  # `datasets` builders that stream local files

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
        self._ready = False  # set by `setup`

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        if not self._ready:
            self.setup("fit")
        rank, world = self._rank()
        sampler = EpochBatchSampler(self._n_train, self.batch_size, seed=self.seed, shuffle=True, rank=rank,
                                    world_size=world)
        return ResumableLoader(sampler, self._train_maker, self.num_workers)

    def val_dataloader(self) -> EvalLoader | list:
        if not self._ready:
            self.setup("fit")
        if self._val_maker is None:
            return []
        rank, world = self._rank()
        return EvalLoader(self._n_val, self.batch_size, self._val_maker, self.num_workers, rank, world)


class PretrainDataModule(_BaseDataModule):
    """Windows of `max_seq_len` sampled from the corpus stream (data_cfg.max_seq_len wins when set); documents
    stay isolated (iLLaDA §2.1). Every corpus is read from token shards on disk (`prepared.py`): a prepared one
    (`data.train_corpus`), or the files / hub data set prepared once into `cache_dir`; with `data.streaming`
    the training windows come from `datasets` streaming instead (`streaming.py`)."""

    def __init__(self, data_cfg: DataConfig, tokenizer, max_seq_len: int, batch_size: int, seed: int = 0):
        data_cfg.validate()
        super().__init__(tokenizer, data_cfg.max_seq_len or max_seq_len, batch_size, seed, data_cfg.num_workers)
        self.cfg = data_cfg

    def _has(self, split: str) -> bool:
        c = self.cfg
        return bool(c.train_corpus or c.train_files if split == "train" else c.val_corpus or c.val_files) \
            or c.hub_name is not None

    def _corpus_dir(self, split: str) -> Path:
        """The split's prepared corpus, preparing it into the cache first when it is not given (a no-op once done)."""
        c = self.cfg
        given = c.train_corpus if split == "train" else c.val_corpus
        if given:
            return resolve_data_path(given)
        files = [] if c.hub_name is not None else (c.train_files if split == "train" else c.val_files)
        sources = json.dumps([c.hub_name, split] if c.hub_name is not None else file_sources(files))
        key = cache_key(sources, c.format, c.text_field, c.text_unit, self.tokenizer.fingerprint())
        out = Path(c.cache_dir) / f"corpus-{key}"
        prepare_corpus(out, self.tokenizer, files=files, hub_name=c.hub_name, hub_split=split, fmt=c.format,
                       text_field=c.text_field, text_unit=c.text_unit, num_proc=c.num_proc)
        return out

    def _stream(self, split: str) -> TokenStream:
        stream = open_prepared(self._corpus_dir(split), self.tokenizer)
        log.info("%s: %d tokens in %d shards, windows of %d", split, stream.n_tokens, len(stream.shards),
                 self.max_seq_len)
        return stream

    def _maker(self, stream: TokenStream, train: bool) -> WindowBatchMaker:
        return WindowBatchMaker(stream, self.max_seq_len, self.cfg.p_split, self.seed, self.tokenizer.pad_id, train)

    def prepare_data(self) -> None:
        """Prepare the corpora once (Lightning runs this on one process per node; `setup` then opens them)."""
        for split in ("train", "validation"):
            if self._has(split) and not (split == "train" and self.cfg.streaming):
                self._corpus_dir(split)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        if self.cfg.streaming:
            self._stream_source()  # bad files are refused now, before training
        else:
            self.train_stream = self._stream("train")
            self._train_maker = self._maker(self.train_stream, train=True)
            self._n_train = len(self._train_maker)
        if self._has("validation"):
            self._val_maker = self._maker(self._stream("validation"), train=False)
            self._n_val = len(self._val_maker)
        self._ready = True

    def _stream_source(self) -> tuple[str, list[str] | None]:
        """The `datasets` source streamed for training: the hub name, or a builder with the local files."""
        c = self.cfg
        if c.hub_name is not None:
            return c.hub_name, None
        kinds = {detect_format(f, c.format) for f in c.train_files}
        if len(kinds) != 1 or not kinds <= set(STREAM_BUILDERS):
            raise DataFileError(f"data.streaming reads jsonl or parquet train_files (one format) or data.hub_name, "
                                f"got {sorted(kinds)} files: prepare them instead (data.streaming=false)")
        return STREAM_BUILDERS[kinds.pop()], [str(check_data_file(f)) for f in c.train_files]

    def train_dataloader(self):
        if not self.cfg.streaming:
            return super().train_dataloader()
        c = self.cfg
        rank, world = self._rank()
        source, files = self._stream_source()
        open_stream = partial(stream_documents, source, "train", c.text_field, data_files=files, rank=rank,
                              world_size=world)
        self._streaming_loader = StreamingLoader(open_stream, self.tokenizer, self.max_seq_len, self.batch_size,
                                                 p_split=c.p_split, seed=self.seed)
        return self._streaming_loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning calls this for the batch a step is about to use: the streaming loader counts it (see
        `StreamingLoader.consume`)."""
        trainer = getattr(self, "trainer", None)
        loader = getattr(self, "_streaming_loader", None)
        if loader is not None and trainer is not None and trainer.training:
            loader.consume()
        return batch


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
        if self._ready:
            return
        self._train_maker, self._n_train = self._maker(self.cfg.train_files, train=True)
        if self.cfg.val_files:
            self._val_maker, self._n_val = self._maker(self.cfg.val_files, train=False)
        self._ready = True
