"""A deterministic, resumable batch loader that Lightning can checkpoint mid-epoch.

Batch i of epoch e is a pure function of (seed, epoch, i): the item order is a permutation seeded by
(seed, epoch) and any randomness inside a batch (the random-length split) uses a generator seeded by
(seed, epoch, i). So the loader's whole state is (epoch, batches yielded this epoch).

Lightning integration (2.6): the fit loop stores `state_dict()` of every loader that satisfies the `_Stateful`
protocol (`state_dict` + `load_state_dict`) in the checkpoint (`FitLoop.on_save_checkpoint`) and, on resume,
calls `load_state_dict` before iterating (`FitLoop._load_combined_loader_states`). This loader has a length,
so Lightning's fetcher does not prefetch, and the count of yielded batches at checkpoint time equals the
number of batches trained on. The loader is deliberately not a `torch.utils.data.DataLoader` subclass: Lightning
would otherwise re-instantiate it to inject a `DistributedSampler`; sharding over ranks is done here instead
(each rank takes every `world_size`-th batch). Lightning calls `sampler.set_epoch(epoch)` at each epoch start
(`_set_sampler_epoch`), which is how a new epoch gets a new order. Worker processes (`num_workers > 0`) only
build batches; the order and the count stay in the main process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class EpochBatchSampler:
    """Which items make batch i of epoch e on this rank; holds the resumable position."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n_items <= 0:
            raise ValueError("the data set is empty: nothing to load")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n_items, self.batch_size, self.seed, self.shuffle = n_items, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # batches already yielded in `epoch`

    def __len__(self) -> int:
        n_batches = -(-self.n_items // self.batch_size)
        return max(n_batches // self.world_size, 1) if self.world_size > 1 else n_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch`, in order."""
        order = np.arange(self.n_items)
        if self.shuffle:
            order = np.random.default_rng(batch_seed(self.seed, epoch)).permutation(self.n_items)
        all_batches = [order[i : i + self.batch_size] for i in range(0, self.n_items, self.batch_size)]
        if self.world_size == 1:
            return all_batches
        mine = all_batches[self.rank :: self.world_size]
        return (mine * len(self))[: len(self)]  # equal count on every rank (repeats if batches < ranks)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "n_items": self.n_items, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "n_items", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data loader: checkpoint has {key}={state[key]}, "
                                 f"this run has {key}={getattr(self, key)} (same data and settings are needed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_batches(tasks, make_batch: Callable, num_workers: int) -> Iterator[dict]:
    """Run `make_batch` over (epoch, batch index, items) tasks, in order, in-process or in workers."""
    if num_workers == 0:
        for epoch, index, items in tasks:
            yield make_batch(items, epoch, index)
        return
    loader = DataLoader(_BatchTasks(list(tasks), make_batch), batch_size=None, shuffle=False,
                        num_workers=num_workers, persistent_workers=False)
    yield from loader


class _BatchTasks(Dataset):
    """Batch k of a fixed list of (epoch, batch index, item indices); built by `make_batch` (picklable)."""

    def __init__(self, tasks: list[tuple[int, int, np.ndarray]], make_batch: Callable):
        self.tasks, self.make_batch = tasks, make_batch

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, k: int):
        epoch, index, items = self.tasks[k]
        return self.make_batch(items, epoch, index)


class ResumableLoader:
    """Iterable of contract batches. `make_batch(items, epoch, batch_index)` builds one batch and must be a
    deterministic function of its arguments (seed its randomness with `batch_seed`)."""

    def __init__(self, sampler: EpochBatchSampler, make_batch: Callable[[np.ndarray, int, int], dict],
                 num_workers: int = 0):
        self.sampler, self.make_batch, self.num_workers = sampler, make_batch, num_workers

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        return self._generate()

    def _generate(self) -> Iterator[dict]:
        # Runs at the first next(), i.e. after Lightning has called set_epoch / load_state_dict.
        s = self.sampler
        epoch, start = s.epoch, s.position
        batches = s.batches(epoch)
        if start >= len(batches):  # the previous pass finished this epoch: start the next one
            epoch, start = epoch + 1, 0
            s.epoch, s.position = epoch, 0
            batches = s.batches(epoch)
        tasks = [(epoch, rank_index, items) for rank_index, items in enumerate(batches)][start:]
        tasks = [(e, s.rank + i * s.world_size, items) for e, i, items in tasks]  # global batch index
        for batch in build_batches(tasks, self.make_batch, self.num_workers):
            s.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class EvalLoader:
    """Validation batches: fixed order, the same batches on every pass (not stateful: each pass restarts)."""

    # Lightning 2.6 inspects `batch_sampler` of any loader that has a `sampler` attribute; this loader
    # batches itself.
    batch_sampler = None

    def __init__(self, n_items: int, batch_size: int, make_batch: Callable[[np.ndarray, int, int], dict],
                 num_workers: int = 0, rank: int = 0, world_size: int = 1):
        self.sampler = EpochBatchSampler(n_items, batch_size, shuffle=False, rank=rank, world_size=world_size)
        self.make_batch, self.num_workers = make_batch, num_workers

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        s = self.sampler
        tasks = [(0, s.rank + i * s.world_size, items) for i, items in enumerate(s.batches(0))]
        return build_batches(tasks, self.make_batch, self.num_workers)


def seeded_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(batch_seed(*parts))
