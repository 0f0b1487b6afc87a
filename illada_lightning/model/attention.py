"""Bidirectional attention over packed documents, behind one function with several kernels.

A packed batch is `[batch, length]` tokens plus `cu_seqlens`: int32 offsets of every document into the
flattened `batch * length` tokens (row ends are document ends too). Tokens attend only inside their own
document (no causal mask: LLaDA §2.2). Backends:

- ``varlen``: PyTorch's `torch.nn.attention.varlen.varlen_attn`, the FlashAttention-based kernel the
  iLLaDA paper cites (§2.1, footnote 1); GPU only, no padding.
- ``flash_attn``: `flash_attn_varlen_func` from the optional `flash-attn` package.
- ``sdpa``: `scaled_dot_product_attention` with a block-diagonal mask built from the document ids
  (CPU and fallback; memory grows with length², fine for short rows).
- ``auto``: varlen, then flash_attn, then sdpa: the first that can run on the inputs' device and dtype.

`reference_attention` is the plain per-document loop that every backend is tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class PackedLayout:
    """Where the documents of a `[batch, length]` input start and end; computed once per forward."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1], offsets into the flattened batch
    max_seqlen: int
    position_ids: torch.Tensor  # int64 [batch, length], restarting at 0 in every document
    doc_ids: torch.Tensor | None  # int64 [batch, length]; None when every row is one document


def row_cu_seqlens(batch: int, length: int, device=None) -> torch.Tensor:
    """`cu_seqlens` for unpacked input: each row is one document."""
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def make_layout(
    batch: int, length: int, cu_seqlens: torch.Tensor | None, max_seqlen: int | None, device
) -> PackedLayout:
    if cu_seqlens is None:
        positions = torch.arange(length, device=device).expand(batch, length)
        return PackedLayout(row_cu_seqlens(batch, length, device), length, positions, None)
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    total = batch * length
    flat = torch.arange(total, device=device)
    # Document index of every token: the number of document ends at or before it.
    doc = torch.searchsorted(cu_seqlens[1:].long(), flat, right=True)
    positions = flat - cu_seqlens.long()[doc]
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; collators pass it
    return PackedLayout(cu_seqlens, max_seqlen, positions.view(batch, length), doc.view(batch, length))


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> None:
    """Validate packing metadata with clear messages (costs a host sync: call it at data-loading time)."""
    cu = cu_seqlens.detach().cpu().long()
    if cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of at least 2 offsets, got shape {tuple(cu.shape)}")
    if cu[0] != 0 or cu[-1] != batch * length:
        raise ValueError(f"cu_seqlens must start at 0 and end at batch*length={batch * length}, got {cu[0]}..{cu[-1]}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
    missing = set(range(0, batch * length + 1, length)) - set(cu.tolist())
    if missing:
        raise ValueError(f"cu_seqlens must contain every row boundary; missing {sorted(missing)[:5]}")


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None and torch.cuda.is_available()


@functools.cache
def _varlen_fn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


_announced: set[str] = set()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `auto` to a concrete kernel and refuse impossible requests with a message that says why."""
    on_gpu = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if on_gpu and half and varlen_available():
            chosen = "varlen"
        elif on_gpu and half and flash_attn_available():
            chosen = "flash_attn"
        else:
            chosen = "sdpa"
        if chosen not in _announced:
            _announced.add(chosen)
            log.info("attention_backend=auto chose %r (device=%s, dtype=%s)", chosen, device.type, dtype)
        return chosen
    if requested == "flash_attn" and not flash_attn_available():
        raise RuntimeError(
            "attention_backend='flash_attn' was requested but the flash-attn package is not installed; "
            "install the optional extra (pip install 'illada-lightning[flash]') or use "
            "model.attention_backend=varlen|sdpa|auto"
        )
    if requested in ("varlen", "flash_attn"):
        if not on_gpu:
            raise RuntimeError(f"attention_backend={requested!r} needs a CUDA device; use sdpa (or auto) on {device.type}")
        if not half:
            raise RuntimeError(
                f"attention_backend={requested!r} needs bf16/fp16 activations (got {dtype}); "
                "train with precision=bf16-mixed or use sdpa"
            )
        if requested == "varlen" and not varlen_available():
            raise RuntimeError("attention_backend='varlen' needs torch.nn.attention.varlen (PyTorch >= 2.10)")
    return requested


# Kept out of torch.compile graphs: the kernels are already fused, and their packing metadata (cu_seqlens,
# max_seqlen) changes shape and value every batch, which would force recompilation.
@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, backend: str) -> torch.Tensor:
    """q: [B, L, H, D]; k, v: [B, L, H_kv, D] -> [B, L, H, D]. `backend` must already be resolved."""
    B, L, H, D = q.shape
    if backend == "sdpa":
        return _sdpa(q, k, v, layout)
    qf, kf, vf = (t.reshape(B * L, t.shape[2], D) for t in (q, k, v))
    cu, m = layout.cu_seqlens, layout.max_seqlen
    if backend == "varlen":
        fn, native_gqa = _varlen_fn()
        if native_gqa:
            out = fn(qf, kf, vf, cu, cu, m, m, enable_gqa=kf.shape[1] != H)
        else:
            kf, vf = _repeat_kv(kf, H), _repeat_kv(vf, H)
            out = fn(qf, kf, vf, cu, cu, m, m)
    elif backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(qf, kf, vf, cu, cu, m, m, causal=False)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return out.view(B, L, H, D)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., H_kv, D] -> [..., H, D]: each KV head serves n_heads / H_kv query heads (GQA)."""
    groups = n_heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def _sdpa(q, k, v, layout: PackedLayout) -> torch.Tensor:
    B, L, H, _ = q.shape
    n_docs = layout.cu_seqlens.numel() - 1
    if layout.doc_ids is not None and n_docs * layout.max_seqlen**2 < B * L * L:
        return _sdpa_per_document(q, k, v, layout)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    mask = None
    if layout.doc_ids is not None:
        d = layout.doc_ids
        mask = (d[:, :, None] == d[:, None, :]).unsqueeze(1)  # [B, 1, L, L] block-diagonal
    # Repeating KV keeps every SDPA kernel eligible (enable_gqa is not supported by all of them with masks).
    k, v = _repeat_kv(k.transpose(1, 2), H).transpose(1, 2), _repeat_kv(v.transpose(1, 2), H).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def _sdpa_per_document(q, k, v, layout: PackedLayout) -> torch.Tensor:
    """SDPA over documents gathered into a padded [n_docs, max_seqlen] batch with a key-padding mask.

    Costs n_docs * max_seqlen² instead of (batch * length)²: what makes a long flat row of many short
    sequences (the sampler's and scorer's packed batches) affordable without a varlen kernel.
    """
    B, L, H, D = q.shape
    n, m = layout.cu_seqlens.numel() - 1, layout.max_seqlen
    slot = (layout.doc_ids * m + layout.position_ids).reshape(-1)  # token -> row-major slot in [n, m]

    def gather(t):
        padded = t.new_zeros(n * m, t.shape[2], D)
        padded[slot] = t.reshape(B * L, t.shape[2], D)
        return _repeat_kv(padded.view(n, m, t.shape[2], D), H).transpose(1, 2)  # [n, H, m, D]

    lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
    keep = (torch.arange(m, device=q.device) < lengths[:, None])[:, None, None, :]  # [n, 1, 1, m]
    out = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=keep)
    return out.transpose(1, 2).reshape(n * m, H, D)[slot].view(B, L, H, D)


def reference_attention(q, k, v, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Plain per-document softmax attention in float64 on flat [T, H, D] tensors (the tests' reference)."""
    H = q.shape[1]
    k, v = _repeat_kv(k, H), _repeat_kv(v, H)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[start:end].double().transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        scores = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[-1])
        out[start:end] = (scores.softmax(-1) @ vd).transpose(0, 1)
    return out
