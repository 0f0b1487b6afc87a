"""`ScoringConfig`: every option of multiple-choice scoring (`scoring.py`), with one list of valid values each.

No torch import in this module: a CLI can parse and check its scoring options before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import reject_unknown
from .sampler_config import PRECISIONS

STRATIFICATIONS = ("uniform", "llada_released")  # LLaDA Eq. 6 mask counts: see likelihood.stratified_counts
RULES = ("confidence", "likelihood")
CACHE_MODES = ("none", "context")  # confidence rule: see diffusion/confidence.py
PARALLEL_MODES = ("off", "threshold")


@dataclass
class ScoringConfig:
    rule: str = "confidence"  # confidence (iLLaDA Eq. 2) | likelihood (LLaDA Eq. 6)
    length_normalize: bool = False  # score / candidate length
    cfg_scale: float = 0.0  # unsupervised CFG (LLaDA Eq. 16), both branches in one forward
    mc_samples: int = 128  # likelihood rule: Monte-Carlo samples per candidate (1 for one-token candidates)
    mc_batch_size: int = 32  # likelihood rule: samples per stratified group of mask counts
    mc_stratification: str = "uniform"  # likelihood rule: uniform (Eq. 6) | llada_released (eval_llada.py's rounding)
    max_tokens_per_batch: int = 32768  # tokens per forward (both CFG branches counted)
    mask_token_id: int | None = None  # default: model.config.mask_token_id
    seed: int | None = None  # likelihood rule: mask sampling
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | bf16 | fp32
    # Fast confidence scoring (approximate; none/off is exact Eq. 2): diffusion/confidence.py.
    cache: str = "none"  # none | context (each question's context K/V computed once, reused by all steps)
    parallel: str = "off"  # off | threshold (also reveal every ground-truth token with p > threshold)
    threshold: float = 0.9

    def validate(self) -> ScoringConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"scoring: {msg}")

        need(self.rule in RULES, f"rule must be one of {RULES}, got {self.rule!r}")
        need(self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}")
        need(self.mc_samples >= 1, f"mc_samples must be >= 1, got {self.mc_samples}")
        need(self.mc_batch_size >= 1, f"mc_batch_size must be >= 1, got {self.mc_batch_size}")
        need(self.mc_stratification in STRATIFICATIONS,
             f"mc_stratification must be one of {STRATIFICATIONS}, got {self.mc_stratification!r}")
        need(self.max_tokens_per_batch >= 1, f"max_tokens_per_batch must be >= 1, got {self.max_tokens_per_batch}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.cache in CACHE_MODES, f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        need(self.parallel in PARALLEL_MODES, f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        need(0 < self.threshold, f"threshold must be > 0, got {self.threshold}")
        return self


def scoring_config(**options) -> ScoringConfig:
    reject_unknown(ScoringConfig, options, "scoring")
    return ScoringConfig(**options).validate()
