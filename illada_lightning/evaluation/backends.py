"""The two model calls evaluation needs, behind two small callables so tests can script them.

- `ChoiceScorer`: `scorer(items) -> scores`, items = [(context_ids, [candidate_ids, ...]), ...], scores = one
  list of floats per item (higher is better). The model-backed one calls `diffusion.scoring.score_batch` with
  the `scoring` group of the `EvalConfig` (`scoring.rule` = "confidence", iLLaDA Eq. 2, or "likelihood",
  LLaDA Eq. 6, seeded).
- `AnswerGenerator`: `generator(prompts, stop_strings) -> generated ids`, prompts = [prompt_ids, ...]. The
  model-backed one calls `diffusion.sampler.generate` with the `sampler` group of the `EvalConfig`.
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
    options = cfg.scoring_options()
    generator = torch.Generator().manual_seed(options.pop("seed"))
    rule = options.pop("rule")

    def score(items: Sequence[Item]) -> list[list[float]]:
        scores = score_batch(model, list(items), rule=rule, generator=generator, **options)
        return [[float(s) for s in row] for row in scores]

    return score


def model_generator(model, tokenizer, cfg: EvalConfig) -> AnswerGenerator:
    from illada_lightning.diffusion.sampler import generate

    options = cfg.sampler_options()
    configured_stops = options.pop("stop_strings")

    def answer(prompts: Sequence[list[int]], stop_strings: Sequence[str] = ()) -> list[list[int]]:
        return generate(model, [list(p) for p in prompts], tokenizer=tokenizer,
                        stop_strings=[*configured_stops, *stop_strings], **options)

    return answer
