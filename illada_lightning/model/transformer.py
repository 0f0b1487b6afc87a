"""The iLLaDA mask predictor: a bidirectional Transformer, read top-down.

RMSNorm, SwiGLU, RoPE, no biases anywhere, grouped-query attention and (optionally) tied input/output
embeddings (iLLaDA §2.1, Table 1). There is no causal mask and no timestep input: the masked-diffusion
predictor is time-free (LLaDA Appendix A.1, Eq. 11).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PackedLayout, attention, make_layout, resolve_backend
from .config import ModelConfig
from .rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability under bf16 autocast, return the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # One fused projection for q, k and v (one GEMM instead of three).
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [B, L, H, D], rotated keys and values [B, L, H_kv, D] (also used by model/kv_cache.py)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = apply_rope(q.view(B, L, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, L, self.n_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(B, L, self.n_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, layout: PackedLayout) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        backend = resolve_backend(self.cfg.attention_backend, q.device, q.dtype)
        return self.out(attention(q, k, v, layout, backend).reshape(*x.shape[:2], -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)  # fused W1 | W3
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, layout: PackedLayout) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layout)
        return x + self.mlp(self.mlp_norm(x))


class MaskPredictor(nn.Module):
    """`model(input_ids)` -> logits. Packed input: `model(input_ids, cu_seqlens=..., max_seqlen=...)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, d_model] LM-head matrix (the embedding itself when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def compile_blocks(self, **compile_kwargs) -> MaskPredictor:
        """torch.compile each Transformer block in place (norms, RoPE, projections and SwiGLU fuse; the
        attention kernel stays eager). Per block rather than whole-model, so the loss's data-dependent
        gather of masked positions and changing packing never trigger recompiles."""
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden_states(self, input_ids: torch.Tensor, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        """Final-norm hidden states [B, L, d_model] (or [T, d_model] for a flat packed input)."""
        flat = input_ids.ndim == 1
        ids = input_ids[None] if flat else input_ids
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length] or flat [tokens], got shape {tuple(input_ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {ids.dtype}")
        B, L = ids.shape
        longest = L if cu_seqlens is None else max_seqlen
        if longest is not None and longest > self.config.max_seq_len:
            raise ValueError(
                f"a sequence of {longest} tokens exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        layout = make_layout(B, L, cu_seqlens, max_seqlen, ids.device)
        cos, sin = rope_cos_sin(layout.position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin, layout)
        x = self.norm(x)
        return x[0] if flat else x

    def forward(self, input_ids: torch.Tensor, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen)
        return F.linear(h, self.output_weight)


def count_parameters(model: MaskPredictor) -> dict[str, int]:
    """Total and non-embedding parameters, counted as iLLaDA Table 1 does (a tied matrix counts once;
    the input embedding and an untied LM head are both 'embedding')."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + (0 if model.lm_head is None else model.lm_head.weight.numel())
    return {"total_params": total, "non_embedding_params": total - embedding, "embedding_params": embedding}
