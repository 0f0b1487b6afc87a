"""Model FLOPs of a training step, for honest throughput / MFU numbers.

Counted as in the scaling-law convention (6 FLOPs per parameter per token for forward + backward) with
two corrections that matter for this model:
- the LM head matmul is counted only for the positions where it is computed: the masked-diffusion loss
  evaluates logits at masked positions only (objective.py), about half the tokens on average;
- attention score/value matmuls are counted for the actual packed document lengths, bidirectionally
  (no causal halving): forward 2 matmuls x 2·n²·(n_heads·head_dim) per layer, backward twice that.
Embedding lookups, norms and element-wise ops are not counted (they are not matmul work).
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import ModelConfig


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters outside the embedding / LM head, from the config alone (no model needed)."""
    hd = cfg.head_dim
    attn = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * cfg.d_model
    mlp = 3 * cfg.d_model * cfg.ffn_dim
    return cfg.n_layers * (attn + mlp + 2 * cfg.d_model) + cfg.d_model


def training_flops(cfg: ModelConfig, doc_lengths: Iterable[int], n_head_tokens: int) -> float:
    """FLOPs of one forward + backward over packed documents of the given lengths."""
    lengths = [int(n) for n in doc_lengths]
    dense = 6.0 * non_embedding_params(cfg) * sum(lengths)
    head = 6.0 * cfg.vocab_size * cfg.d_model * n_head_tokens
    attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * sum(n * n for n in lengths)
    return dense + head + attention
