"""Block KV caching (Fast-dLLM, Wu et al. 2025) for packed, optionally CFG-doubled inference batches.

During one semi-autoregressive block of the sampler only the block's tokens change. With a cache, the first
step of the block is one full forward that also stores every layer's keys/values; the later steps of the
block recompute only some positions and read the stored keys/values of the others:

- ``cache="prefix"``: the prompt and the finished blocks come from the cache; the current block and the
  masked suffix after it are recomputed at every step.
- ``cache="dual"``: the masked suffix comes from the cache too; only the current block is recomputed.
- ``cache="none"``: a full forward at every step (LLaDA's reference algorithm, exact).

Every block starts with a fresh full forward (the cache is refreshed when a block is finished), so the first
step of each block is exact. The later steps are an approximation whenever the cached keys/values would have
changed (layers above the first see the block's new tokens through bidirectional attention); with one layer
they do not, and the cached sampler equals the exact one (tests/test_kv_cache.py).
"""

from __future__ import annotations

import torch

from ..model.kv_cache import cached_hidden_states, cross_layout, full_layout, supports_kv_cache
from .packed_inference import PackedForward, cu_seqlens_from_lengths, segment_positions
from .sampler_config import CACHE_MODES  # noqa: F401  (the list lives with the option)


def check_cacheable(model, cache: str) -> None:
    if cache != "none" and not supports_kv_cache(model):
        raise ValueError(f"cache={cache!r} needs a MaskPredictor (blocks, embed, norm, output_weight); "
                         f"got {type(model).__name__}: use cache=none")


class CachedPack:
    """Positions `recompute` (host bool [T]) of a pack with host `seq_lens` are queries; the rest is cached.

    Call `full(ids)` once (fills the cache), then `step(ids)` for every later forward with the same layout.
    Both return a PackedForward. With CFG the unconditional copy (Eq. 16) is cached the same way.
    """

    def __init__(self, model, seq_lens: torch.Tensor, recompute: torch.Tensor, is_prompt: torch.Tensor,
                 mask_token_id: int | None, cfg_scale: float, device):
        self.model, self.is_prompt, self.mask_token_id, self.cfg_scale = model, is_prompt, mask_token_id, cfg_scale
        self.total = int(seq_lens.sum())
        lens, rec = (seq_lens.repeat(2), recompute.repeat(2)) if cfg_scale else (seq_lens, recompute)
        self.full_layout = full_layout(lens, device)
        seq, local = segment_positions(lens)
        idx = rec.nonzero()[:, 0]
        row_of = torch.full((rec.numel(),), -1, dtype=torch.long)
        row_of[idx] = torch.arange(idx.numel())
        self.key_src = torch.where(rec, rec.numel() + row_of, torch.arange(rec.numel())).to(device)
        q_lens = torch.bincount(seq[idx], minlength=len(lens))
        self.step_layout = cross_layout(q_lens, lens, local[idx], device)
        self.idx, self.row_of = idx.to(device), row_of.to(device)
        self.kv = None

    def _ids(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg_scale:
            return x
        return torch.cat([x, x.masked_fill(self.is_prompt, self.mask_token_id)])  # as packed_inference.cfg_pack

    def full(self, x: torch.Tensor) -> PackedForward:
        hidden, self.kv = cached_hidden_states(self.model, self._ids(x), self.full_layout)
        return PackedForward.from_features(hidden, self.model.output_weight, self.total, self.cfg_scale)

    def step(self, x: torch.Tensor) -> PackedForward:
        hidden, _ = cached_hidden_states(self.model, self._ids(x)[self.idx], self.step_layout, self.key_src, self.kv)
        return PackedForward.from_features(hidden, self.model.output_weight, self.total, self.cfg_scale,
                                           row_of=self.row_of)


class BlockForward:
    """The forwards of one sampler block: `fwd = forward(x)` with the block's current pack `x`."""

    def __init__(self, model, seq_lens: torch.Tensor, prompt_lens: torch.Tensor, start: int, length: int,
                 is_prompt: torch.Tensor, mask_token_id: int, cfg_scale: float, cache: str, device):
        self.model, self.is_prompt, self.mask_token_id, self.cfg_scale = model, is_prompt, mask_token_id, cfg_scale
        self.cu = cu_seqlens_from_lengths(seq_lens).to(device)
        self.max_seqlen = int(seq_lens.max())
        self.cached = None
        if cache != "none":
            seq, local = segment_positions(seq_lens)
            after = local >= prompt_lens[seq] + start  # the block and everything after it
            recompute = after & (local < prompt_lens[seq] + start + length) if cache == "dual" else after
            self.cached = CachedPack(model, seq_lens, recompute, is_prompt, mask_token_id, cfg_scale, device)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> PackedForward:
        self.calls += 1
        if self.cached is None:
            return PackedForward(self.model, x, self.cu, self.max_seqlen, is_prompt=self.is_prompt,
                                 mask_token_id=self.mask_token_id, cfg_scale=self.cfg_scale)
        return self.cached.full(x) if self.calls == 1 else self.cached.step(x)
