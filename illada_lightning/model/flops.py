"""Model FLOPs of a training step and the device's measured matmul rate: the two halves of an honest MFU.

FLOPs are counted as in the scaling-law convention (6 FLOPs per parameter per token for forward + backward)
with two corrections that matter for this model:
- the LM head matmul is counted only for the positions where it is computed: the masked-diffusion loss
  evaluates logits at masked positions only (objective.py), about half the tokens on average;
- attention score/value matmuls are counted for the actual packed document lengths, bidirectionally
  (no causal halving): forward 2 matmuls x 2·n²·(n_heads·head_dim) per layer, backward twice that.
Embedding lookups, norms and element-wise ops are not counted (they are not matmul work).

MFU divides by a bf16 GEMM rate measured on the device (`measured_gemm_tflops`), not by a datasheet peak
(torchtitan divides by the spec sheet), so the ratio means the same on any GPU.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Iterable

import torch

from .config import ModelConfig


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters outside the embedding / LM head, from the config alone (no model needed)."""
    hd = cfg.head_dim
    attn = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.d_model
    mlp = 3 * cfg.d_model * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp + 2 * cfg.d_model) + cfg.d_model


def flops_from_counts(cfg: ModelConfig, n_tokens, sum_squared_lengths, n_head_tokens):
    """FLOPs of one forward + backward from three counts: tokens, the sum of squared document lengths and
    the positions that get LM-head logits. Numbers or tensors alike: on device tensors (float64 for long
    runs) it needs no host sync, so training can count every step and read the total at log steps only."""
    dense = 6.0 * non_embedding_params(cfg) * n_tokens
    head = 6.0 * cfg.vocab_size * cfg.d_model * n_head_tokens
    attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * sum_squared_lengths
    return dense + head + attention


def training_flops(cfg: ModelConfig, doc_lengths: Iterable[int], n_head_tokens: int) -> float:
    """FLOPs of one forward + backward over packed documents of the given lengths."""
    lengths = [int(n) for n in doc_lengths]
    return flops_from_counts(cfg, sum(lengths), sum(n * n for n in lengths), n_head_tokens)


def squared_segment_lengths(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Sum of squared attention-segment lengths of a batch [B, L] (float64, on its device, no host sync):
    the packed documents of `cu_seqlens`, or one L-long segment per row without it."""
    if cu_seqlens is None:
        rows, length = input_ids.shape
        return torch.tensor(float(rows * length * length), dtype=torch.float64, device=input_ids.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return lengths.square().sum()


@functools.cache
def _gemm_tflops(device_index: int, n: int, reps: int) -> float:
    device = torch.device("cuda", device_index)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))  # zeros run faster
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def measured_gemm_tflops(device: torch.device | str, n: int = 8192, reps: int = 20) -> float | None:
    """bf16 GEMM rate of a CUDA device in TFLOP/s: an n³ matmul timed with CUDA events, median of `reps`;
    measured once per device and process (cached), None on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _gemm_tflops(device.index if device.index is not None else torch.cuda.current_device(), n, reps)
