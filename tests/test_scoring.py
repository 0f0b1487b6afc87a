"""Multiple-choice scoring: iLLaDA Eq. 2 against a brute-force loop, LLaDA Eq. 6 against an exact joint."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from illada_lightning import build_model
from illada_lightning.diffusion.likelihood import (
    STRATIFICATIONS,
    grouped_mask_counts,
    stratified_counts,
    stratified_mask_counts,
)
from illada_lightning.diffusion.scoring import score_batch, score_choices
from tests.test_sampler import Recorder

MASK = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", n_layers=2, init_std=0.1, attention_backend="sdpa").double().eval()


@torch.no_grad()
def brute_force_confidence(model, context, candidate):
    """iLLaDA Eq. 2, one candidate, one position at a time."""
    P, L = len(context), len(candidate)
    x = torch.tensor(list(context) + [MASK] * L)
    masked, total = set(range(L)), 0.0
    for _ in range(L):
        logp = model(x[None])[0].double().log_softmax(-1)
        best = max(sorted(masked), key=lambda i: float(logp[P + i, candidate[i]]))
        total += float(logp[P + best, candidate[best]])
        x[P + best] = candidate[best]
        masked.remove(best)
    return total


ITEMS = [
    ([5, 17, 99], [[40, 41], [42], [43, 44, 45, 46]]),
    ([7, 8, 9, 10, 11, 12], [[50, 51, 52], [53, 54, 55]]),
    ([13], [[60], [61, 62, 63, 64, 65], [66, 67]]),
]


def test_confidence_equals_brute_force(model):
    got = score_batch(model, ITEMS, rule="confidence")
    for (context, candidates), scores in zip(ITEMS, got):
        expected = [brute_force_confidence(model, context, c) for c in candidates]
        assert torch.allclose(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)


def test_confidence_reveals_each_candidate_token_exactly_once(model):
    rec = Recorder(model)
    score_batch(rec, ITEMS, rule="confidence")
    longest = max(len(c) for _, cands in ITEMS for c in cands)
    assert len(rec.calls) == longest  # L forwards for the longest candidate; all candidates batched
    by_context = {tuple(ctx): cands for ctx, cands in ITEMS}
    history: dict[tuple, list[torch.Tensor]] = {}
    for ids, cu in rec.calls:
        bounds = cu.tolist()
        seen_here = {}
        for a, b in zip(bounds[:-1], bounds[1:]):
            doc = ids[a:b]
            for ctx, cands in by_context.items():
                for j, cand in enumerate(cands):
                    if len(doc) == len(ctx) + len(cand) and tuple(doc[: len(ctx)].tolist()) == ctx:
                        revealed = doc[len(ctx) :]
                        if all(r in (MASK, t) for r, t in zip(revealed.tolist(), cand)):
                            seen_here.setdefault((ctx, j), revealed)
        for key, rev in seen_here.items():
            history.setdefault(key, []).append(rev)
    for (ctx, j), revs in history.items():
        cand = by_context[ctx][j]
        assert len(revs) == len(cand), "one forward per candidate token"
        n_masked = [int((r == MASK).sum()) for r in revs]
        assert n_masked == list(range(len(cand), 0, -1)), "exactly one new ground-truth token per step"
    assert len(history) == sum(len(c) for _, c in ITEMS)


def test_confidence_is_invariant_to_batch_composition(model):
    together = score_batch(model, ITEMS, rule="confidence")
    alone = [score_choices(model, ctx, cands) for ctx, cands in ITEMS]
    chunked = score_batch(model, ITEMS, rule="confidence", max_tokens_per_batch=7)  # one pair per forward
    reordered = score_batch(model, ITEMS[::-1], rule="confidence")[::-1]
    for a, b, c, d in zip(together, alone, chunked, reordered):
        assert torch.allclose(a, b, atol=1e-10) and torch.allclose(a, c, atol=1e-10)
        assert torch.allclose(a, d, atol=1e-10)


def test_length_normalize(model):
    raw = score_choices(model, [5, 6], [[7, 8], [9]])
    norm = score_choices(model, [5, 6], [[7, 8], [9]], length_normalize=True)
    assert torch.allclose(norm, raw / torch.tensor([2.0, 1.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Likelihood rule against a toy model whose conditionals come from an explicit joint distribution.


class JointModel(nn.Module):
    """p(x) over all length-`n` strings of tokens {0, 1, 2}; predicts exact conditionals p(x_i | visible)."""

    def __init__(self, n=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.seqs = torch.tensor(list(itertools.product(range(3), repeat=n)))  # [3^n, n]
        weights = torch.rand(len(self.seqs), generator=g, dtype=torch.float64) ** 3  # uneven, all > 0
        self.joint = weights / weights.sum()
        self.n = n
        self.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=None, max_seq_len=n)

    def forward(self, ids, cu_seqlens=None, max_seqlen=None):
        docs = ids.view(-1, self.n)  # every packed document has length n
        assert torch.equal(cu_seqlens.long(), torch.arange(0, ids.numel() + 1, self.n))
        visible = docs != MASK
        consistent = (~visible[:, None, :] | (self.seqs[None] == docs[:, None, :])).all(-1)  # [D, S]
        weights = consistent.double() * self.joint  # [D, S]
        onehot = torch.nn.functional.one_hot(self.seqs, 4).double()  # [S, n, 4]
        marg = torch.einsum("ds,snv->dnv", weights, onehot)
        marg = marg / marg.sum(-1, keepdim=True)
        return marg.clamp_min(1e-300).log().view(-1, 4)

    def log_conditional(self, context, answer) -> float:
        P = len(context)
        ctx_match = (self.seqs[:, :P] == torch.tensor(context)).all(1)
        full = ctx_match & (self.seqs[:, P:] == torch.tensor(answer)).all(1)
        return math.log(float(self.joint[full].sum() / self.joint[ctx_match].sum()))


def exact_eq6_moments(toy, context, answer):
    """Mean and variance of one Eq. 6 sample (l uniform, l positions uniform), by enumeration."""
    L, P = len(answer), len(context)
    values, probs = [], []
    for n_masked in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), n_masked))
        for S in subsets:
            x = torch.tensor(list(context) + [MASK if i in S else a for i, a in enumerate(answer)])
            logp = toy(x, cu_seqlens=torch.tensor([0, len(x)]))
            values.append(L / n_masked * sum(float(logp[P + i, answer[i]]) for i in S))
            probs.append(1 / L / len(subsets))
    v, p = torch.tensor(values, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)
    mean = float((p * v).sum())
    return mean, float((p * (v - mean) ** 2).sum())


def test_eq6_expectation_is_the_exact_conditional_likelihood():
    toy = JointModel()
    mean, _ = exact_eq6_moments(toy, [1], [0, 2, 1])
    assert mean == pytest.approx(toy.log_conditional([1], [0, 2, 1]), abs=1e-9)


def test_likelihood_monte_carlo_converges_to_exact():
    toy = JointModel()
    context, candidates = [2], [[0, 2, 1], [1, 1, 0], [2, 0, 0]]
    n = 3000
    got = score_choices(toy, context, candidates, rule="likelihood", mc_samples=n, mc_batch_size=32, seed=0)
    for score, cand in zip(got.tolist(), candidates):
        mean, var = exact_eq6_moments(toy, context, cand)
        assert abs(score - toy.log_conditional(context, cand)) < 4 * math.sqrt(var / n) + 1e-9


def test_single_token_candidates_use_one_exact_sample():
    toy = JointModel()
    rec = Recorder(toy)
    got = score_choices(rec, [0, 1, 2], [[0], [1], [2]], rule="likelihood", mc_samples=128, seed=0)
    assert len(rec.calls) == 1 and rec.calls[0][0].numel() == 3 * 4  # one sample per candidate
    exact = torch.tensor([toy.log_conditional([0, 1, 2], [a]) for a in range(3)], dtype=torch.float64)
    assert torch.allclose(got, exact, atol=1e-12)
    assert torch.allclose(got, score_choices(toy, [0, 1, 2], [[0], [1], [2]], rule="confidence"), atol=1e-12)


def test_likelihood_cfg_zero_equals_plain_and_cfg_changes_scores(model):
    a = score_choices(model, [5, 6], [[7, 8], [9, 10, 11]], rule="likelihood", mc_samples=16, seed=3)
    b = score_choices(model, [5, 6], [[7, 8], [9, 10, 11]], rule="likelihood", mc_samples=16, seed=3, cfg_scale=0.0)
    c = score_choices(model, [5, 6], [[7, 8], [9, 10, 11]], rule="likelihood", mc_samples=16, seed=3, cfg_scale=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_grouped_counts_follow_the_single_group_formula():
    lengths, n = torch.tensor([5, 3, 7]), torch.tensor([8, 8, 6])
    for mode in STRATIFICATIONS:
        counts = grouped_mask_counts(lengths, n, group=4, generator=torch.Generator().manual_seed(0), mode=mode)
        offset = 0
        for L, total in zip(lengths.tolist(), n.tolist()):
            for g0 in range(0, total, 4):
                size = min(4, total - g0)
                group = counts[offset + g0 : offset + g0 + size]
                start = torch.tensor(int(group[0]))  # index 0 of a group is its random start in 1..L
                expected = stratified_counts(torch.tensor(L), torch.arange(size), torch.tensor(size), start, mode)
                assert torch.equal(group, expected)
            offset += total
    many = grouped_mask_counts(torch.tensor([6]), torch.tensor([6000]), group=1)
    assert torch.bincount(many, minlength=7)[1:].min() > 850  # starts uniform over 1..L
    assert stratified_mask_counts(4, 5).max() <= 5


def test_likelihood_scores_follow_the_stratification_option(model):
    kw = dict(rule="likelihood", mc_samples=8, mc_batch_size=8, seed=3)
    a = score_choices(model, [5, 6], [[7, 8, 9, 10], [9, 10]], **kw)
    b = score_choices(model, [5, 6], [[7, 8, 9, 10], [9, 10]], mc_stratification="uniform", **kw)
    c = score_choices(model, [5, 6], [[7, 8, 9, 10], [9, 10]], mc_stratification="llada_released", **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)  # L = 4, n = 8 hits halves: the two rules differ
    with pytest.raises(ValueError, match="mc_stratification"):
        score_choices(model, [5, 6], [[7, 8]], mc_stratification="rounded", **kw)


@pytest.mark.parametrize(
    "context,candidates,options,error,match",
    [
        ([5, 6], [[7], []], {}, ValueError, "candidate 1 has zero tokens"),
        ([5, MASK], [[7]], {}, ValueError, "context contains the mask token"),
        ([5, 6], [[7, MASK]], {}, ValueError, "candidate 0 contains the mask token"),
        ([5, 6], [], {}, ValueError, "no candidates"),
        (list(range(10, 260)), [[7, 8, 9, 10, 11, 12, 13]], {}, ValueError, "max_seq_len"),
        ([5, 6], [[7]], {"rule": "ppl"}, ValueError, "rule"),
        ([5, 6], [[7]], {"mc_samples": 0}, ValueError, "mc_samples"),
        ([5, 6], [[7]], {"num_samples": 4}, TypeError, "num_samples"),
    ],
)
def test_bad_input_errors(model, context, candidates, options, error, match):
    with pytest.raises(error, match=match):
        score_choices(model, context, candidates, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_scores_match_cpu(model):
    gpu = build_model("tiny", n_layers=2, init_std=0.1, device="cuda").eval()
    gpu.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for rule in ("confidence", "likelihood"):
        cpu_scores = score_batch(model, ITEMS, rule=rule, mc_samples=8, seed=0)
        gpu_scores = score_batch(gpu, ITEMS, rule=rule, mc_samples=8, seed=0)  # bf16 autocast
        for a, b in zip(cpu_scores, gpu_scores):
            assert torch.allclose(a, b, rtol=0.05, atol=0.1)  # bf16 rounding only: same masks (CPU seed)
