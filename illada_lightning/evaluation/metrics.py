"""Accuracy (or exact match) with its standard error, computed with torchmetrics.

The standard error is the binomial one, sqrt(p (1 - p) / n): each example is an independent Bernoulli trial
with success probability p, estimated by the observed accuracy. (lm-evaluation-harness reports the sample
standard error sqrt(p (1 - p) / (n - 1)); the two differ by a factor sqrt(n / (n - 1)), under 0.1% at n = 500.)

`MeanMetric` and `SumMetric` synchronise across processes when `torch.distributed` is initialised, so the
per-epoch callback's sharded evaluation gathers to the same numbers on every rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torchmetrics.aggregation import MeanMetric, SumMetric


def binomial_stderr(p: float, n: float) -> float:
    if n <= 0 or math.isnan(p):
        return float("nan")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def _sync_device() -> torch.device:
    """NCCL gathers only CUDA tensors: the metric states go to this rank's GPU under NCCL, else stay on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def accuracy_with_stderr(correct: Sequence[bool | float], name: str = "acc", sync: bool = False) -> dict[str, float]:
    """`{name: mean, name_stderr: binomial standard error, "n": count}`, gathered over ranks under
    torch.distributed when `sync` (then every rank must call it)."""
    device = _sync_device() if sync else torch.device("cpu")
    mean = MeanMetric(sync_on_compute=sync).to(device)
    count = SumMetric(sync_on_compute=sync).to(device)
    values = torch.tensor([float(c) for c in correct], dtype=torch.float64, device=device)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    if len(values):
        mean.update(values)
        count.update(torch.full((1,), float(len(values)), dtype=torch.float64, device=device))
    else:
        # A rank with no examples still joins the gather, contributing weight 0.
        mean.update(zero, weight=zero)
        count.update(zero)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank with no examples sees "mean of an empty set"
        p, n = float(mean.compute()), float(count.compute())
    return {name: p, f"{name}_stderr": binomial_stderr(p, n), "n": int(round(n))}
