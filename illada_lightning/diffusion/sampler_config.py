"""`SamplerConfig`: every option of the reverse-process sampler (`diffusion/sampler.py`), validated in one place.

The one list of valid values per option (`REMASKING`, `CACHE_MODES`, `PARALLEL_MODES`, `PRECISIONS`) lives here; the
evaluation, preview and generate configs nest this dataclass instead of copying its fields.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..options import reject_unknown

log = logging.getLogger(__name__)

# No torch import in this module: a CLI can parse and check its sampler options before torch loads.
PRECISIONS = ("auto", "bf16", "fp32")  # inference precision (packed_inference.inference_context)
CACHE_MODES = ("none", "prefix", "dual")  # block KV cache (block_cache.py)

REMASKING = ("low_confidence", "random")
PARALLEL_MODES = ("off", "threshold", "factor")


@dataclass
class SamplerConfig:
    """Every sampler option (LLaDA §2.4 / Appendix B.4, iLLaDA §2.3 / Appendix A)."""

    steps: int = 128  # forward passes for the whole budget, split evenly across blocks (fewer if it ends early)
    gen_length: int = 128  # fixed-length mode: response length
    block_length: int | None = None  # None: gen_length (fixed mode) or 32 (variable mode)
    remasking: str = "low_confidence"  # low_confidence (Alg. 5) | random (Alg. 4)
    temperature: float = 0.0  # 0 = greedy
    cfg_scale: float = 0.0  # unsupervised CFG weight w of LLaDA Eq. 16
    logits_eos_inf: bool = False
    confidence_eos_inf: bool = False
    variable_length: bool = False  # iLLaDA §2.3 block-by-block generation
    max_new_tokens: int | None = None  # variable mode budget (default gen_length)
    stop_token_ids: list[int] = field(default_factory=list)  # end generation like EOS (excluded from output)
    stop_strings: list[str] = field(default_factory=list)  # need `decode` / `tokenizer`
    think_end_token_id: int | None = None  # e.g. the id of </think>; None disables the boost
    think_boost_max: float = 5.0
    think_boost_start: int = 0
    think_boost_ramp: int = 1024
    mask_token_id: int | None = None  # default: model.config.mask_token_id
    eos_token_id: int | None = None  # default: model.config.eos_token_id
    seed: int | None = None  # for temperature > 0 and random remasking
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | bf16 | fp32
    # Fast decoding (Fast-dLLM, Wu et al. 2025; approximate, see diffusion/block_cache.py). none/off: exact.
    cache: str = "none"  # none | prefix (prompt + finished blocks cached) | dual (also the masked suffix)
    parallel: str = "off"  # off | threshold: also reveal every masked block token with confidence > threshold
    threshold: float = 0.9  # | factor: Fast-dLLM's factor rule, (n + 1)(1 - c_n) <= factor for the n-th most confident
    factor: float = 1.0
    cuda_graph: bool = False  # cache != none on CUDA: replay each block's cached step as a CUDA graph (same tokens)

    def validate(self) -> SamplerConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"sampler: {msg}")

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.gen_length >= 1, f"gen_length must be >= 1, got {self.gen_length}")
        need(self.block_length is None or self.block_length >= 1, f"block_length must be >= 1, got {self.block_length}")
        need(self.remasking in REMASKING, f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.cache in CACHE_MODES, f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        need(self.parallel in PARALLEL_MODES, f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        need(self.threshold > 0, f"threshold must be > 0, got {self.threshold}")
        need(self.factor > 0, f"factor must be > 0, got {self.factor}")
        need(self.parallel == "off" or self.remasking == "low_confidence",
             f"parallel={self.parallel} ranks by confidence: it needs remasking=low_confidence, got {self.remasking!r}")
        need(self.think_boost_ramp >= 1, f"think_boost_ramp must be >= 1, got {self.think_boost_ramp}")
        if self.max_new_tokens is not None:
            need(self.variable_length, "max_new_tokens applies to variable_length=True; use gen_length for fixed-length generation")
            need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.variable_length:
            need(
                self.gen_length % self.resolved_block_length == 0,
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}",
            )
        need(
            self.steps % self.n_blocks == 0,
            f"steps={self.steps} does not divide across the {self.n_blocks} blocks of length "
            f"{self.resolved_block_length} (choose steps as a multiple of {self.n_blocks})",
        )
        return self

    @property
    def budget(self) -> int:
        """Most tokens one prompt may receive."""
        return self.max_new_tokens if self.variable_length and self.max_new_tokens else self.gen_length

    @property
    def resolved_block_length(self) -> int:
        if self.block_length is not None:
            return min(self.block_length, self.budget)
        return min(32, self.budget) if self.variable_length else self.gen_length

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.budget / self.resolved_block_length)

    def block_plan(self) -> list[tuple[int, int, list[int]]]:
        """(start, length, tokens revealed per step) for every block."""
        bl, per_block = self.resolved_block_length, self.steps // self.n_blocks
        if per_block > bl:
            log.info("sampler: %d steps per block exceed block_length=%d; using %d (extra steps reveal nothing)",
                     per_block, bl, bl)
        plan = []
        for start in range(0, self.budget, bl):
            n = min(bl, self.budget - start)
            plan.append((start, n, transfer_schedule(n, min(per_block, n))))
        return plan


def sampler_config(**options) -> SamplerConfig:
    """Build and validate a SamplerConfig; an unknown option is a TypeError naming it."""
    reject_unknown(SamplerConfig, options, "sampler")
    for key in ("stop_token_ids", "stop_strings"):
        if key in options and options[key] is not None:
            options[key] = list(options[key])
        elif key in options:
            options[key] = []
    return SamplerConfig(**options).validate()


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens revealed at each of `steps` steps for a block of `n_masked` masks (the linear schedule)."""
    base, extra = divmod(n_masked, steps)
    return [base + (i < extra) for i in range(steps)]


def think_boost(config: SamplerConfig, generated: int) -> float:
    """Logit bias for the stop-thinking token after `generated` response tokens (iLLaDA Appendix A)."""
    ramp = (generated - config.think_boost_start) / config.think_boost_ramp
    return config.think_boost_max * min(1.0, max(0.0, ramp))
