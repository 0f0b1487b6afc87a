"""The two model calls evaluation needs, behind two small callables so tests can script them.

- `ChoiceScorer`: `scorer(items) -> scores`, items = [(context_ids, [candidate_ids, ...]), ...], scores = one
  list of floats per item (higher is better). The model-backed one calls `diffusion.scoring.score_batch` with
  `scoring_rule` = "confidence" (iLLaDA Eq. 2) or "likelihood" (LLaDA Eq. 6, `mc_samples`, `mc_batch_size`,
  `cfg_scale`, seeded).
- `AnswerGenerator`: `generator(prompts, stop_strings) -> generated ids`, prompts = [prompt_ids, ...]. The
  model-backed one calls `diffusion.sampler.generate` with the sampler options of the `EvalConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .config import EvalConfig

Item = tuple[list[int], list[list[int]]]


class ChoiceScorer(Protocol):
    def __call__(self, items: Sequence[Item]) -> list[list[float]]: ...


class AnswerGenerator(Protocol):
    def __call__(self, prompts: Sequence[list[int]], stop_strings: Sequence[str] = ()) -> list[list[int]]: ...


def model_scorer(model, cfg: EvalConfig) -> ChoiceScorer:
    from illada_lightning.diffusion.scoring import score_batch

    # One generator for the whole evaluation: the Monte-Carlo masks of the likelihood rule are reproducible
    # for a seed (the confidence rule is deterministic and ignores it).
    generator = torch.Generator().manual_seed(cfg.seed)
    options = {}
    if cfg.scoring_rule == "likelihood":
        options = dict(mc_samples=cfg.mc_samples, mc_batch_size=cfg.mc_batch_size, cfg_scale=cfg.cfg_scale,
                       mc_stratification=cfg.mc_stratification, generator=generator)

    def score(items: Sequence[Item]) -> list[list[float]]:
        scores = score_batch(model, list(items), rule=cfg.scoring_rule, **options)
        return [[float(s) for s in row] for row in scores]

    return score


def model_generator(model, tokenizer, cfg: EvalConfig) -> AnswerGenerator:
    from illada_lightning.diffusion.sampler import generate

    options = cfg.sampler_options()

    def answer(prompts: Sequence[list[int]], stop_strings: Sequence[str] = ()) -> list[list[int]]:
        return generate(model, [list(p) for p in prompts], tokenizer=tokenizer, stop_strings=list(stop_strings),
                        **options)

    return answer
