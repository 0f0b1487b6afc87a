"""iLLaDA's confidence score (Eq. 2) for a group of (context, candidate) pairs, exact or with a context KV cache.

Start from the context followed by an all-masked candidate; at each step, among the still-masked positions
reveal the ground-truth token at the position where the model gives the ground-truth token the highest
probability, and add that log-probability (L forwards for L tokens, deterministic).

- ``cache="none"`` (default, exact): every step is a full forward of context + candidate.
- ``cache="context"``: the keys/values of every question's context are computed ONCE (one forward of the
  context followed by as many masks as the question's longest candidate, i.e. the first step of exact
  scoring for that candidate; with CFG also of the all-mask unconditional copy) and reused by every step of
  every candidate of the question; each step recomputes only the candidates' tokens (model/kv_cache.py). An
  approximation (Fast-dLLM's prefix cache applied to scoring): exact when keys/values of the context do not
  depend on the candidate (a one-layer model), otherwise measured by benchmarks/scoring_bench.py.
- ``parallel="threshold"``: a step also reveals every still-masked ground-truth token whose probability
  exceeds `threshold` (at least the most confident one), adding all their log-probabilities.

With the cache the LM head runs only at the still-masked slots (`_masked_log_probs`), not at every slot of
every alive candidate: over a candidate of L tokens that is L(L+1)/2 head rows instead of L·longest, the
largest cost of a cached step for a small model with a large vocabulary.

Pairs come sorted longest candidate first, so the pack only shrinks at its end as candidates finish.
"""

from __future__ import annotations

import math

import torch

from ..model.kv_cache import cached_hidden_states, cross_layout, full_layout
from .packed_inference import PackedForward, cu_seqlens_from_lengths, segment_positions


class _Targets:
    """Per-pair candidate slots [n, longest] (slots past a candidate's end point at its first slot, never count)."""

    def __init__(self, pairs, device):
        self.ctx_lens = torch.tensor([p.context.numel() for p in pairs])
        self.cand_lens = torch.tensor([p.candidate.numel() for p in pairs])
        self.longest = int(self.cand_lens[0])
        slot = torch.arange(self.longest)
        valid = slot < self.cand_lens[:, None]
        self.slot = torch.where(valid, slot, 0)
        targets = torch.zeros(len(pairs), self.longest, dtype=torch.long)
        targets[valid] = torch.cat([p.candidate for p in pairs])
        self.targets, self.valid = targets.to(device), valid.to(device)

    def alive(self, step: int) -> int:
        return int((self.cand_lens > step).sum())  # host: candidates are sorted longest first


def _reveal(logp, still_masked, scores, alive, threshold):
    """Add the revealed log-probs to `scores`, clear `still_masked`; returns (rows, slots) revealed."""
    logp = logp.masked_fill(~still_masked[:alive], float("-inf"))
    best = logp.argmax(1)  # the most confident still-masked ground-truth token
    rows = torch.arange(alive, device=logp.device)
    if threshold is None:
        scores[:alive] += logp[rows, best]
        still_masked[rows, best] = False
        return rows, best
    reveal = torch.zeros_like(still_masked[:alive])
    reveal[rows, best] = True
    reveal = (reveal | (logp > math.log(threshold))) & still_masked[:alive]
    scores[:alive] += torch.where(reveal, logp, 0.0).sum(1)
    still_masked[:alive] &= ~reveal
    return reveal.nonzero(as_tuple=True)


def _done(still_masked, threshold) -> bool:
    return threshold is not None and not bool(still_masked.any())


def confidence_exact(model, pairs, mask_id: int, cfg_scale: float, device, threshold=None) -> torch.Tensor:
    """Eq. 2 with a full forward of every alive pair per step; float64 [n] on `device`."""
    t = _Targets(pairs, device)
    seq_lens = t.ctx_lens + t.cand_lens
    cu = cu_seqlens_from_lengths(seq_lens)
    seq, local = segment_positions(seq_lens)
    is_prompt = local < t.ctx_lens[seq]
    x = torch.full((int(seq_lens.sum()),), mask_id, dtype=torch.long)
    x[is_prompt] = torch.cat([p.context for p in pairs])
    positions = cu[:-1, None].long() + t.ctx_lens[:, None] + t.slot
    x, is_prompt, positions, cu_dev = (v.to(device) for v in (x, is_prompt, positions, cu))
    still_masked = t.valid.clone()
    scores = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    for step in range(t.longest):
        alive = t.alive(step)
        tokens = int(cu[alive])
        fwd = PackedForward(model, x[:tokens], cu_dev[: alive + 1], int(seq_lens[:alive].max()),
                            is_prompt=is_prompt[:tokens], mask_token_id=mask_id, cfg_scale=cfg_scale)
        logp = fwd.target_log_probs(positions[:alive], t.targets[:alive]).double()
        r, s = _reveal(logp, still_masked, scores, alive, threshold)
        x[positions[r, s]] = t.targets[r, s]
        if _done(still_masked, threshold):
            break
    return scores


def _context_cache(model, pairs, mask_id: int, cfg_scale: float, device, n_masks: dict[int, int] | None):
    """(per-layer K/V of every question's context, question index of every pair, context offsets).
    `n_masks[item]`: masks after the context (default: the longest candidate of the item among `pairs`)."""
    first: dict[int, int] = {}
    question = torch.tensor([first.setdefault(p.item, len(first)) for p in pairs])
    contexts = [None] * len(first)
    for p, q in zip(pairs, question.tolist()):
        contexts[q] = p.context
    # Each context is followed by as many masks as its question's longest candidate: the context's keys/values
    # then see what they see at the first step of exact scoring (exactly so for that candidate).
    longest = [0] * len(first)
    for p, q in zip(pairs, question.tolist()):
        longest[q] = n_masks[p.item] if n_masks else max(longest[q], p.candidate.numel())
    ids = [torch.cat([c, torch.full((int(n),), mask_id)]) for c, n in zip(contexts, longest)]
    if cfg_scale:  # the unconditional branch's context is all masks (LLaDA Eq. 16)
        ids += [torch.full_like(x, mask_id) for x in ids]
    lens = torch.tensor([x.numel() for x in ids])
    ids = torch.cat(ids)
    _, kv = cached_hidden_states(model, ids.to(device), full_layout(lens, device))
    return kv, question, cu_seqlens_from_lengths(lens)[:-1].long()


def _step_layout(t: _Targets, alive: int, question, ctx_start, n_ctx_tokens: int, cfg: bool, device):
    """Queries: the candidate slots of the first `alive` pairs (then again for CFG's unconditional branch);
    keys of each: its question's cached context, then its own candidate slots."""
    branches = 2 if cfg else 1
    seq_id = torch.arange(branches * alive)
    pair, branch = seq_id % alive, seq_id // alive
    ctx_of = ctx_start[question[pair] + branch * (ctx_start.numel() // branches)]  # context start in the cache
    q_lens, c_lens = t.cand_lens[pair], t.ctx_lens[pair]
    q_start = cu_seqlens_from_lengths(q_lens)[:-1].long()
    k_lens = c_lens + q_lens
    k_seq, k_local = segment_positions(k_lens)
    from_ctx = k_local < c_lens[k_seq]
    key_src = torch.where(from_ctx, ctx_of[k_seq] + k_local, n_ctx_tokens + q_start[k_seq] + k_local - c_lens[k_seq])
    q_seq, q_local = segment_positions(q_lens)
    layout = cross_layout(q_lens, k_lens, c_lens[q_seq] + q_local, device)
    rows = q_start[:alive, None] + t.slot[:alive]
    return layout, key_src.to(device), rows.to(device), int(q_lens[:alive].sum())


def _masked_log_probs(fwd, rows, targets, still_masked, count: int | None) -> torch.Tensor:
    """log p(target) [alive, longest] at the still-masked slots (-inf elsewhere); the head runs only there.
    `count`: how many are still masked, when the host knows it (no sync); else found on the device."""
    flat = still_masked.reshape(-1)
    if count is None:
        where = flat.nonzero()[:, 0]
    else:  # the masked slots first, in order: a fixed-size answer without a host sync
        where = torch.sort((~flat).to(torch.uint8), stable=True).indices[:count]
    out = torch.full(flat.shape, float("-inf"), dtype=torch.float64, device=flat.device)
    out[where] = fwd.target_log_probs(rows.reshape(-1)[where], targets.reshape(-1)[where]).double()
    return out.view(still_masked.shape)


def confidence_cached(model, pairs, mask_id: int, cfg_scale: float, device, threshold=None,
                      n_masks: dict[int, int] | None = None) -> torch.Tensor:
    """Eq. 2 with each context's keys/values computed once and reused by every step of every candidate.
    `n_masks`: masks after each item's context, from ALL its candidates (so a score does not depend on how the
    candidates were split into groups)."""
    t = _Targets(pairs, device)
    kv, question, ctx_start = _context_cache(model, pairs, mask_id, cfg_scale, device, n_masks)
    n_ctx_tokens = kv[0][0].shape[0]
    cand = torch.full((len(pairs), t.longest), mask_id, dtype=torch.long, device=device)
    still_masked = t.valid.clone()
    scores = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    layout_of: dict[int, tuple] = {}
    for step in range(t.longest):
        alive = t.alive(step)
        if alive not in layout_of:
            layout_of = {alive: _step_layout(t, alive, question, ctx_start, n_ctx_tokens, bool(cfg_scale), device)}
        layout, key_src, rows, n_q = layout_of[alive]
        ids = cand[:alive][t.valid[:alive]]
        ids = torch.cat([ids, ids]) if cfg_scale else ids
        hidden, _ = cached_hidden_states(model, ids, layout, key_src, kv)
        fwd = PackedForward.from_features(hidden, model.output_weight, n_q, cfg_scale)
        # one token revealed per pair and step without a threshold: len - step still masked in each alive pair
        count = None if threshold is not None else int((t.cand_lens[:alive] - step).sum())
        logp = _masked_log_probs(fwd, rows, t.targets[:alive], still_masked[:alive], count)
        r, s = _reveal(logp, still_masked, scores, alive, threshold)
        cand[r, s] = t.targets[r, s]
        if _done(still_masked, threshold):
            break
    return scores
