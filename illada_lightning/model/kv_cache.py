"""Running the mask predictor on a few query tokens against cached keys/values (block KV caching).

Fast-dLLM (Wu et al., 2025) speeds up masked-diffusion decoding by computing the keys/values of the tokens
that do not change during a semi-autoregressive block once, and recomputing only the tokens that do. Here
that is one primitive: the query tokens (packed, with their own `cu_seqlens`) run through every layer; at
each layer their fresh keys/values are combined with the cached ones of an earlier forward as
``torch.cat([cached, fresh])[key_src]`` (key sequences packed with `cu_k`), and the queries attend to those.

- A forward with no cache (`cached=None`, `key_src=None`) is an ordinary full forward that also returns
  every layer's keys/values: the cache of the next steps.
- The cache is exact only for layer 0 (keys/values of layer l > 0 depend, through bidirectional attention,
  on the tokens being recomputed). Callers therefore treat it as an approximation and refresh it per block.

Every layer is reached through the model's own modules (`Block.attn.project`, `attn.out`, `mlp`, norms),
so the cached path computes exactly what `MaskPredictor.hidden_states` computes for the same keys/values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import _repeat_kv, _varlen_fn, resolve_backend
from .rope import rope_cos_sin

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [T, H_kv, D] (keys rotated)


@dataclass
class CrossLayout:
    """Query and key packing of one cached forward (fixed for all steps of a block)."""

    positions: torch.Tensor  # int64 [Tq]: RoPE position of every query token inside its sequence
    cu_q: torch.Tensor  # int32 [n + 1]
    cu_k: torch.Tensor  # int32 [n + 1]
    max_q: int
    max_k: int
    q_slot: torch.Tensor  # int64 [Tq]: row-major slot in a padded [n, max_q] batch (sdpa)
    k_slot: torch.Tensor  # int64 [Tk]: row-major slot in a padded [n, max_k] batch (sdpa)
    k_keep: torch.Tensor  # bool [n, 1, 1, max_k]: real keys of the padded batch (sdpa)


def _slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = F.pad(lengths.cumsum(0), (1, 0))[:-1]
    return seq * width + torch.arange(int(lengths.sum())) - starts[seq]


def cross_layout(q_lengths: torch.Tensor, k_lengths: torch.Tensor, positions: torch.Tensor, device) -> CrossLayout:
    """Layout from host lengths of the query and key sequences (same count) and the queries' positions."""
    max_q, max_k = int(q_lengths.max()), int(k_lengths.max())
    return CrossLayout(
        positions=positions.to(device),
        cu_q=F.pad(q_lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        cu_k=F.pad(k_lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32),
        max_q=max_q, max_k=max_k,
        q_slot=_slots(q_lengths, max_q).to(device), k_slot=_slots(k_lengths, max_k).to(device),
        k_keep=(torch.arange(max_k) < k_lengths[:, None])[:, None, None, :].to(device),
    )


def full_layout(lengths: torch.Tensor, device) -> CrossLayout:
    """Every token is a query and a key: the layout of an ordinary (cache-filling) forward."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    positions = torch.arange(int(lengths.sum())) - F.pad(lengths.cumsum(0), (1, 0))[seq]
    return cross_layout(lengths, lengths, positions, device)


def _padded(t: torch.Tensor, slot: torch.Tensor, n: int, width: int, n_heads: int) -> torch.Tensor:
    out = t.new_zeros(n * width, t.shape[1], t.shape[2])
    out[slot] = t
    return _repeat_kv(out.view(n, width, t.shape[1], t.shape[2]), n_heads).transpose(1, 2)  # [n, H, w, D]


def cross_attention(q, k, v, layout: CrossLayout, backend: str) -> torch.Tensor:
    """q [Tq, H, D] attends, sequence by sequence, to k, v [Tk, H_kv, D] -> [Tq, H, D] (no causal mask)."""
    H = q.shape[1]
    if backend == "varlen":
        fn, native_gqa = _varlen_fn()
        if not native_gqa:
            k, v = _repeat_kv(k, H), _repeat_kv(v, H)
        extra = {"enable_gqa": k.shape[1] != H} if native_gqa else {}
        return fn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **extra)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, causal=False)
    n = layout.cu_q.numel() - 1
    out = F.scaled_dot_product_attention(
        _padded(q, layout.q_slot, n, layout.max_q, H), _padded(k, layout.k_slot, n, layout.max_k, H),
        _padded(v, layout.k_slot, n, layout.max_k, H), attn_mask=layout.k_keep,
    )
    return out.transpose(1, 2).reshape(n * layout.max_q, H, -1)[layout.q_slot]


def supports_kv_cache(model) -> bool:
    return all(hasattr(model, name) for name in ("blocks", "embed", "norm", "output_weight"))


def cached_hidden_states(model, ids: torch.Tensor, layout: CrossLayout, key_src: torch.Tensor | None = None,
                         cached: KV | None = None) -> tuple[torch.Tensor, KV]:
    """Final-norm hidden states [Tq, d_model] of the query tokens `ids` [Tq], and their own keys/values.

    Keys/values of layer i: `torch.cat([cached[i], fresh])[key_src]` (with no cache: `fresh[key_src]`,
    or `fresh` itself when `key_src` is None).
    """
    cfg = model.config
    if layout.max_k > cfg.max_seq_len:
        raise ValueError(f"a sequence of {layout.max_k} tokens exceeds model.max_seq_len={cfg.max_seq_len}")
    cos, sin = rope_cos_sin(layout.positions[None], cfg.head_dim, cfg.rope_theta)
    x = model.embed(ids)[None]  # [1, Tq, D]
    fresh: KV = []
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.attn_norm(x), cos, sin)
        q, k, v = q[0], k[0], v[0]
        fresh.append((k, v))
        if cached is not None:
            k, v = torch.cat([cached[i][0], k]), torch.cat([cached[i][1], v])
        if key_src is not None:
            k, v = k[key_src], v[key_src]
        backend = resolve_backend(cfg.attention_backend, q.device, q.dtype)
        x = x + block.attn.out(cross_attention(q, k, v, layout, backend).reshape(1, q.shape[0], -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.norm(x)[0], fresh
