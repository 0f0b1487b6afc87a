"""Multiple-choice scoring: iLLaDA's confidence rule (Eq. 2) and LLaDA's likelihood rule (Eq. 6).

Both return one float per candidate, higher is better (the raw scores, not only the argmax).

``rule="confidence"`` (iLLaDA §2.3, Eq. 2): start from the context followed by an all-masked candidate;
at each of L steps, among the still-masked positions reveal the ground-truth token at the position where
the model gives the ground-truth token the highest probability, and add that log-probability. L forward
passes for L tokens; deterministic. It is a scoring surrogate, not a likelihood.

``rule="likelihood"`` (LLaDA Eq. 6): the Monte-Carlo estimate of `likelihood.mc_log_likelihood`
(`mc_samples`, stratified mask counts within each group of `mc_batch_size` samples, optional CFG), but
for all candidates at once. A one-token candidate always has l = 1: its single estimate is exactly
log p(y | context, [M]), so it gets one sample, not `mc_samples` (LLaDA B.6 uses one sample for
single-token benchmarks for the same reason).

Batching: every (context, candidate) pair of every question is its own packed sequence (flat tokens +
`cu_seqlens`, no padding); pairs are sorted by length and cut into forwards of at most
`max_tokens_per_batch` tokens. In confidence scoring the pack only shrinks when the shortest candidates
finish (they are at its end, so the pack is a prefix slice), so each of the L steps is one forward.
`length_normalize` divides a score by the candidate's length. Fast confidence scoring (`cache=context`,
`parallel=threshold`, approximate) is described in `diffusion/confidence.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.kv_cache import supports_kv_cache
from .confidence import confidence_cached, confidence_exact
from .likelihood import grouped_mask_counts
from .packed_inference import (
    PackedForward,
    cu_seqlens_from_lengths,
    inference_context,
    model_device,
    model_special_ids,
    segment_positions,
)
from .scoring_config import ScoringConfig, scoring_config  # noqa: F401  (options live there, torch-free)


@dataclass
class _Pair:
    """One (context, candidate) pair: its question, candidate index and tokens (host tensors)."""

    item: int
    choice: int
    context: torch.Tensor
    candidate: torch.Tensor

    @property
    def length(self) -> int:
        return self.context.numel() + self.candidate.numel()


def _as_ids(x, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a 1-D tensor or a list of ints ({err})") from None
    return t.cpu()


def _pairs(items, mask_id: int, max_seq_len: int | None) -> list[_Pair]:
    pairs = []
    for q, (context, candidates) in enumerate(items):
        ctx = _as_ids(context, f"item {q}: context")
        if bool((ctx == mask_id).any()):
            raise ValueError(f"item {q}: the context contains the mask token id {mask_id}")
        if len(candidates) == 0:
            raise ValueError(f"item {q}: no candidates to score")
        for c, cand in enumerate(candidates):
            y = _as_ids(cand, f"item {q}, candidate {c}")
            if y.numel() == 0:
                raise ValueError(f"item {q}, candidate {c} has zero tokens: an empty candidate cannot be scored")
            if bool((y == mask_id).any()):
                raise ValueError(f"item {q}, candidate {c} contains the mask token id {mask_id}")
            if max_seq_len is not None and ctx.numel() + y.numel() > max_seq_len:
                raise ValueError(f"item {q}, candidate {c}: context + candidate = {ctx.numel() + y.numel()} "
                                 f"tokens > model.max_seq_len={max_seq_len}")
            pairs.append(_Pair(q, c, ctx, y))
    return pairs


def _chunks(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) ranges whose sizes sum to at most `budget` (at least one element each)."""
    ranges, start, used = [], 0, 0
    for i, s in enumerate(sizes):
        if i > start and used + s > budget:
            ranges.append((start, i))
            start, used = i, 0
        used += s
    if sizes:
        ranges.append((start, len(sizes)))
    return ranges


# --------------------------------------------------------------------------------------------------
# Confidence rule (iLLaDA Eq. 2)


def _confidence_scores(model, pairs: list[_Pair], mask_id: int, config: ScoringConfig, device) -> torch.Tensor:
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].candidate.numel())
    factor = 2 if config.cfg_scale else 1
    out = torch.zeros(len(pairs), dtype=torch.float64)
    threshold = config.threshold if config.parallel == "threshold" else None
    n_masks: dict[int, int] = {}  # context cache: masks after each context = its longest candidate
    for p in pairs:
        n_masks[p.item] = max(n_masks.get(p.item, 0), p.candidate.numel())
    for start, end in _chunks([pairs[i].length * factor for i in order], config.max_tokens_per_batch):
        group = [pairs[i] for i in order[start:end]]
        if config.cache == "context":
            scores = confidence_cached(model, group, mask_id, config.cfg_scale, device, threshold, n_masks)
        else:
            scores = confidence_exact(model, group, mask_id, config.cfg_scale, device, threshold)
        out[order[start:end]] = scores.cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Likelihood rule (LLaDA Eq. 6)


class _PairTable:
    """Every pair's tokens (context then candidate) in one flat host tensor, for vectorised row building."""

    def __init__(self, pairs: list[_Pair]):
        self.ctx_lens = torch.tensor([p.context.numel() for p in pairs])
        self.cand_lens = torch.tensor([p.candidate.numel() for p in pairs])
        self.offsets = cu_seqlens_from_lengths(self.ctx_lens + self.cand_lens)[:-1].long()
        self.tokens = torch.cat([t for p in pairs for t in (p.context, p.candidate)])


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without stalling the host on queued GPU work (pinned, non-blocking)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _likelihood_rows(model, table: _PairTable, cand_of_row, counts, mask_id, cfg_scale, device,
                     generator) -> torch.Tensor:
    """Eq. 6 terms (L / l) * sum_masked log p for rows (one Monte-Carlo sample each); float64 on device."""
    ctx_lens, cand_lens = table.ctx_lens[cand_of_row], table.cand_lens[cand_of_row]
    seq_lens = ctx_lens + cand_lens
    cu = cu_seqlens_from_lengths(seq_lens)
    seq, local = segment_positions(seq_lens)
    is_prompt = local < ctx_lens[seq]
    x = table.tokens[table.offsets[cand_of_row][seq] + local]
    # Mask exactly l of the candidate tokens, uniformly without replacement (ranks of uniform noise).
    longest = int(cand_lens.max())
    noise = torch.rand(len(cand_of_row), longest, generator=generator)
    noise[torch.arange(longest) >= cand_lens[:, None]] = 2.0  # padding ranks last, never masked
    masked = noise.argsort(1).argsort(1) < counts[:, None]
    row_of, slot = masked.nonzero(as_tuple=True)
    flat_pos = cu[:-1].long()[row_of] + ctx_lens[row_of] + slot
    targets = x[flat_pos]
    x[flat_pos] = mask_id
    weight = cand_lens.double() / counts.double()
    x, cu, is_prompt, flat_pos, targets, row_of, weight = (
        _to_device(t, device) for t in (x, cu, is_prompt, flat_pos, targets, row_of, weight))
    fwd = PackedForward(model, x, cu, int(seq_lens.max()), is_prompt=is_prompt, mask_token_id=mask_id,
                        cfg_scale=cfg_scale)
    logp = fwd.target_log_probs(flat_pos, targets).double()
    sums = torch.zeros(len(cand_of_row), dtype=torch.float64, device=device).index_add_(0, row_of, logp)
    return sums * weight


def _likelihood_scores(model, pairs, mask_id, config: ScoringConfig, device, generator) -> torch.Tensor:
    table = _PairTable(pairs)
    n_samples = torch.where(table.cand_lens == 1, 1, config.mc_samples)
    counts = grouped_mask_counts(table.cand_lens, n_samples, config.mc_batch_size, generator,
                                 config.mc_stratification)
    cand_of_row = torch.repeat_interleave(torch.arange(len(pairs)), n_samples)
    factor = 2 if config.cfg_scale else 1
    sizes = ((table.ctx_lens + table.cand_lens)[cand_of_row] * factor).tolist()
    totals = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    for start, end in _chunks(sizes, config.max_tokens_per_batch):  # no host sync inside this loop
        values = _likelihood_rows(model, table, cand_of_row[start:end], counts[start:end], mask_id,
                                  config.cfg_scale, device, generator)
        totals.index_add_(0, _to_device(cand_of_row[start:end], device), values)
    return totals.cpu() / n_samples.double()


# --------------------------------------------------------------------------------------------------
# Public API


def score_batch(model, items: Sequence, rule: str = "confidence", *, generator: torch.Generator | None = None,
                **options) -> list[torch.Tensor]:
    """Scores for many questions at once: `items` = [(context_ids, [candidate_ids, ...]), ...].

    Returns one float64 CPU tensor [n_candidates] per item (higher is better). Options: `ScoringConfig`.
    `generator` (a CPU torch.Generator) drives the likelihood rule's masks; else `seed`.
    """
    config = scoring_config(rule=rule, **options)
    special = model_special_ids(model)
    mask_id = config.mask_token_id if config.mask_token_id is not None else special["mask_token_id"]
    if mask_id is None:
        raise ValueError("mask_token_id is unknown: the model has no config; pass mask_token_id=...")
    if config.rule == "confidence" and config.cache != "none" and not supports_kv_cache(model):
        raise ValueError(f"scoring cache={config.cache!r} needs a MaskPredictor; got {type(model).__name__}: "
                         "use cache=none")
    pairs = _pairs(items, mask_id, special["max_seq_len"])
    device = model_device(model)
    if generator is None and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    with inference_context(device, config.precision, model):
        if config.rule == "confidence":
            flat = _confidence_scores(model, pairs, mask_id, config, device)
        else:
            flat = _likelihood_scores(model, pairs, mask_id, config, device, generator)
    if config.length_normalize:
        flat = flat / torch.tensor([p.candidate.numel() for p in pairs], dtype=torch.float64)
    out = [torch.zeros(len(candidates), dtype=torch.float64) for _, candidates in items]
    for p, value in zip(pairs, flat.tolist()):
        out[p.item][p.choice] = value
    return out


def score_choices(model, context_ids, candidate_ids_list, rule: str = "confidence", *,
                  generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """One score per candidate continuation of `context_ids` (float64 [n_candidates], higher is better)."""
    return score_batch(model, [(context_ids, candidate_ids_list)], rule, generator=generator, **options)[0]
