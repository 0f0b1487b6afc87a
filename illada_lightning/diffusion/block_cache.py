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

`cuda_graph=True` (CUDA only): inside a block every cached step has the same shapes, layout and cache, so the
step is captured once as a CUDA graph and replayed (`GraphedCall`): the same kernels on the same inputs, so the
same tokens, without the ~40 kernel launches per layer that Python issues otherwise (with a cache the query
tokens are few and the launches, not the GPU, bound a step).
"""

from __future__ import annotations

import logging

import torch

from ..model.kv_cache import cached_hidden_states, cross_layout, full_layout, supports_kv_cache
from .packed_inference import PackedForward, cu_seqlens_from_lengths, segment_positions
from .sampler_config import CACHE_MODES  # noqa: F401  (the list lives with the option)

log = logging.getLogger(__name__)
graph_counts = {"captured": 0, "replayed": 0, "failed": 0}  # diagnostics for benchmarks (this process)


class GraphedCall:
    """`fn(x)` for a same-shaped `x` every call: the first call runs eagerly on a side stream (warm-up: lazy
    initialisation must not happen during capture), the second is captured into a CUDA graph and replayed, later
    ones copy `x` into the captured input and replay. A capture that fails (an operation that synchronises
    with the host) is logged, and the calls stay eager."""

    def __init__(self, fn):
        self.fn, self.calls, self.graph, self.failed = fn, 0, None, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.static_in.copy_(x)
            self.graph.replay()
            graph_counts["replayed"] += 1
            return self.static_out
        if self.failed:
            return self.fn(x)
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        if self.calls == 1:
            with torch.cuda.stream(side):
                out = self.fn(x)
            current.wait_stream(side)
            out.record_stream(current)
            return out
        self.static_in = x.clone()
        graph = torch.cuda.CUDAGraph()
        kind = "cuda"
        # Casts recorded in the graph, not cached by autocast in the graph's memory (the documented rule).
        no_cache = torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                                  enabled=torch.is_autocast_enabled(kind), cache_enabled=False)
        try:
            with torch.cuda.stream(side), no_cache:
                graph.capture_begin()
                try:
                    self.static_out = self.fn(self.static_in)
                finally:
                    graph.capture_end()
        except RuntimeError as exc:
            self.failed = True
            graph_counts["failed"] += 1
            log.warning("cuda_graph: capturing the cached step failed (%s); this block runs eagerly",
                        str(exc).splitlines()[0])
            torch.cuda.synchronize()
            return self.fn(x)
        current.wait_stream(side)
        self.graph = graph
        graph_counts["captured"] += 1
        graph.replay()
        return self.static_out


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
                 mask_token_id: int | None, cfg_scale: float, device, cuda_graph: bool = False):
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
        self.graphed = GraphedCall(self._step_hidden) if cuda_graph and torch.device(device).type == "cuda" else None

    def _ids(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg_scale:
            return x
        return torch.cat([x, x.masked_fill(self.is_prompt, self.mask_token_id)])  # as packed_inference.cfg_pack

    def full(self, x: torch.Tensor) -> PackedForward:
        hidden, self.kv = cached_hidden_states(self.model, self._ids(x), self.full_layout)
        return PackedForward.from_features(hidden, self.model.output_weight, self.total, self.cfg_scale)

    def _step_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return cached_hidden_states(self.model, ids, self.step_layout, self.key_src, self.kv)[0]

    def step(self, x: torch.Tensor) -> PackedForward:
        ids = self._ids(x)[self.idx]
        hidden = self.graphed(ids) if self.graphed is not None else self._step_hidden(ids)
        return PackedForward.from_features(hidden, self.model.output_weight, self.total, self.cfg_scale,
                                           row_of=self.row_of)


class BlockForward:
    """The forwards of one sampler block: `fwd = forward(x)` with the block's current pack `x`."""

    def __init__(self, model, seq_lens: torch.Tensor, prompt_lens: torch.Tensor, start: int, length: int,
                 is_prompt: torch.Tensor, mask_token_id: int, cfg_scale: float, cache: str, device,
                 cuda_graph: bool = False):
        self.model, self.is_prompt, self.mask_token_id, self.cfg_scale = model, is_prompt, mask_token_id, cfg_scale
        self.cu = cu_seqlens_from_lengths(seq_lens).to(device)
        self.max_seqlen = int(seq_lens.max())
        self.cached = None
        if cache != "none":
            seq, local = segment_positions(seq_lens)
            after = local >= prompt_lens[seq] + start  # the block and everything after it
            recompute = after & (local < prompt_lens[seq] + start + length) if cache == "dual" else after
            self.cached = CachedPack(model, seq_lens, recompute, is_prompt, mask_token_id, cfg_scale, device,
                                     cuda_graph)
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> PackedForward:
        self.calls += 1
        if self.cached is None:
            return PackedForward(self.model, x, self.cu, self.max_seqlen, is_prompt=self.is_prompt,
                                 mask_token_id=self.mask_token_id, cfg_scale=self.cfg_scale)
        return self.cached.full(x) if self.calls == 1 else self.cached.step(x)
