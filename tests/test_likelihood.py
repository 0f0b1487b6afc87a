"""LLaDA Eq. 6: the lower-variance Monte-Carlo conditional log-likelihood."""

import itertools
import math

import pytest
import torch

from illada_lightning.diffusion.likelihood import (
    mask_exactly,
    mc_log_likelihood,
    stratified_counts,
    stratified_mask_counts,
)

MASK = 4  # vocabulary {0, 1, 2} + unused 3 + mask 4


class JointModel(torch.nn.Module):
    """Exact conditionals p(x_i | visible tokens) of an explicit joint over answers of length L.

    The prompt is ignored, so log p(answer | prompt) = log joint(answer). The model is consistent, so Eq. 6's
    expectation equals the exact log-likelihood (LLaDA Appendix A.2: Eq. 14 = Eq. 15 = log p for a consistent model).
    """

    def __init__(self, prompt_len, length, vocab=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.P, self.L, self.V = prompt_len, length, vocab
        self.seqs = list(itertools.product(range(vocab), repeat=length))
        self.joint = torch.rand(len(self.seqs), generator=g, dtype=torch.float64) ** 3
        self.joint /= self.joint.sum()

    def forward(self, ids):
        out = torch.full((*ids.shape, MASK + 1), -1e9, dtype=torch.float64)
        for b in range(ids.shape[0]):
            ans = ids[b, self.P:]
            ok = torch.tensor([all(a == MASK or a == s for a, s in zip(ans.tolist(), seq)) for seq in self.seqs])
            w = self.joint * ok
            for i in range(self.L):
                probs = torch.zeros(self.V, dtype=torch.float64)
                for seq, wi in zip(self.seqs, w):
                    probs[seq[i]] += wi
                out[b, self.P + i, : self.V] = (probs / probs.sum()).clamp_min(1e-300).log()
        return out

    def exact(self, answer):
        return self.joint[self.seqs.index(tuple(answer))].log().item()


def test_certain_model_scores_zero():
    class Certain(torch.nn.Module):
        def forward(self, ids):
            logits = torch.full((*ids.shape, 8), -1e4)
            logits[..., 5] = 1e4  # all mass on token 5
            return logits

    score = mc_log_likelihood(Certain(), torch.tensor([1, 2]), torch.tensor([5, 5, 5]), mask_token_id=7,
                              mc_samples=16)
    assert score.item() == pytest.approx(0.0, abs=1e-6)


def test_estimate_is_unbiased_for_a_consistent_toy_model():
    model = JointModel(prompt_len=2, length=3)
    answer = [2, 0, 1]
    est = mc_log_likelihood(model, torch.tensor([0, 1]), torch.tensor(answer), mask_token_id=MASK,
                            mc_samples=600, mc_batch_size=60, generator=torch.Generator().manual_seed(0))
    assert est.item() == pytest.approx(model.exact(answer), abs=0.05 * abs(model.exact(answer)) + 0.02)


def test_exact_expectation_by_enumeration_equals_log_likelihood():
    # Enumerate l and every subset: E_l E_subset[L/l * sum log p] must equal log p(answer) exactly.
    model = JointModel(prompt_len=1, length=3, seed=1)
    answer = [1, 1, 0]
    L = 3
    total = 0.0
    for size in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), size))
        for sub in subsets:
            ids = torch.tensor([[0] + [MASK if i in sub else a for i, a in enumerate(answer)]])
            logp = model(ids)[0, 1:]
            s = sum(logp[i, answer[i]].item() for i in sub)
            total += (L / size) * s / len(subsets) / L
    assert total == pytest.approx(model.exact(answer), abs=1e-9)


def test_single_token_answer_single_sample_is_exact():
    model = JointModel(prompt_len=2, length=1)
    est = mc_log_likelihood(model, torch.tensor([0, 1]), torch.tensor([2]), mask_token_id=MASK, mc_samples=1)
    assert est.item() == pytest.approx(model.exact([2]), abs=1e-9)


def test_stratified_counts_cover_range_and_mask_exactly():
    g = torch.Generator().manual_seed(0)
    counts = stratified_mask_counts(10, 10, g)
    assert sorted(counts.tolist()) == list(range(1, 11))  # n == L: every l exactly once
    m = mask_exactly(counts, 10, g)
    assert torch.equal(m.sum(1), counts)


def test_cfg_zero_equals_no_cfg_and_empty_answer_error():
    model = JointModel(prompt_len=1, length=2)
    a = mc_log_likelihood(model, torch.tensor([0]), torch.tensor([1, 2]), mask_token_id=MASK, mc_samples=4,
                          generator=torch.Generator().manual_seed(0))
    b = mc_log_likelihood(model, torch.tensor([0]), torch.tensor([1, 2]), mask_token_id=MASK, mc_samples=4,
                          cfg_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item() and math.isfinite(a.item())
    with pytest.raises(ValueError, match="empty answer"):
        mc_log_likelihood(model, torch.tensor([0]), torch.tensor([], dtype=torch.long), mask_token_id=MASK)


# --- Eq. 6 stratification: every l in 1..L equally likely for every sample (issue: round-half-even bias) ---


def test_every_sample_is_marginally_uniform_over_the_starts():
    """For every L, n <= 64 and sample i, the L equally likely starts give each l in 1..L exactly once."""
    for L in range(1, 65):
        starts = torch.arange(1, L + 1)
        for n in range(1, 65):
            index = torch.arange(n)[:, None]
            counts = stratified_counts(torch.tensor(L), index, torch.tensor(n), starts[None, :])
            assert torch.equal(counts.sort(dim=1).values, starts.expand(n, L)), (L, n)


def test_released_rounding_is_not_uniform():
    """The rounding of LLaDA's eval_llada.py (kept as an option) favours even l: L=4, n=32 gives 7/32, 9/32, ..."""
    L, n = 4, 32
    starts = torch.arange(1, L + 1)[None, :]
    counts = stratified_counts(torch.tensor(L), torch.arange(n)[:, None], torch.tensor(n), starts, "llada_released")
    assert torch.bincount(counts.flatten(), minlength=L + 1)[1:].tolist() == [28, 36, 28, 36]
    with pytest.raises(ValueError, match="mc_stratification"):
        stratified_counts(torch.tensor(L), torch.tensor(0), torch.tensor(n), torch.tensor(1), "round")


class FastJointModel(torch.nn.Module):
    """JointModel's exact conditionals, vectorised (one-hot table of all answers) for many forwards."""

    def __init__(self, prompt_len, length, vocab=3, seed=0, sharpness=6.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.P, self.L, self.V = prompt_len, length, vocab
        self.seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # [S, L]
        self.joint = torch.softmax(sharpness * torch.randn(len(self.seqs), generator=g, dtype=torch.float64), 0)
        self.onehot = torch.nn.functional.one_hot(self.seqs, vocab).double()  # [S, L, V]

    def forward(self, ids):
        ans = ids[:, self.P:]
        ok = ((ans[:, None, :] == MASK) | (ans[:, None, :] == self.seqs[None])).all(-1)  # [B, S]
        probs = torch.einsum("bs,slv->blv", self.joint * ok, self.onehot)
        out = torch.full((*ids.shape, MASK + 1), -1e9, dtype=torch.float64)
        out[:, self.P:, : self.V] = (probs / probs.sum(-1, keepdim=True)).clamp_min(1e-300).log()
        return out

    def eq6_term(self, answer, masked):
        """(L / l) * sum over masked positions of log p(answer_i | unmasked answer), for one mask set."""
        ids = torch.tensor([[0] * self.P + [MASK if m else a for a, m in zip(answer, masked)]])
        logp = self(ids)[0, self.P:].gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
        return self.L / sum(masked) * sum(float(v) for v, m in zip(logp, masked) if m)

    def per_count_expectation(self, answer):
        """E[Eq. 6 term | l] for l = 1..L, enumerating every mask set of size l."""
        out = []
        for count in range(1, self.L + 1):
            sets = [s for s in itertools.product([0, 1], repeat=self.L) if sum(s) == count]
            out.append(sum(self.eq6_term(answer, s) for s in sets) / len(sets))
        return torch.tensor(out, dtype=torch.float64)


def _mean_and_stderr(model, answer, mode, repeats, n):
    g = torch.Generator().manual_seed(0)
    estimates = torch.stack([
        mc_log_likelihood(model, torch.tensor([0, 1]), torch.tensor(answer), mask_token_id=MASK, mc_samples=n,
                          mc_batch_size=n, generator=g, mc_stratification=mode)
        for _ in range(repeats)])
    return estimates.mean().item(), (estimates.std() / math.sqrt(repeats)).item()


def test_mc_estimate_is_unbiased_where_the_counts_hit_halves():
    """L = 4, n = 8: i * L / n ends in .5 for odd i. The mean of many independent estimates lies within 4 standard
    errors of the exact Eq. 6 expectation (every l equally likely), enumerated over all mask sets."""
    model, answer = FastJointModel(prompt_len=2, length=4), [2, 0, 1, 1]
    per_count = model.per_count_expectation(answer)
    exact = per_count.mean().item()
    assert exact == pytest.approx(math.log(model.joint[model.seqs.tolist().index(answer)]), abs=1e-9)
    mean, se = _mean_and_stderr(model, answer, "uniform", repeats=400, n=8)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # The released rounding weights the counts unequally (enumerated over starts and samples): the mean lands on
    # that weighting instead, many standard errors away. Shown so that this test demonstrably separates the rules.
    starts, index = torch.arange(1, 5)[None, :], torch.arange(8)[:, None]
    counts = stratified_counts(torch.tensor(4), index, torch.tensor(8), starts, "llada_released")
    weights = torch.bincount(counts.flatten(), minlength=5)[1:].double() / counts.numel()
    assert not torch.allclose(weights, torch.full((4,), 0.25, dtype=torch.float64))
    released = (per_count * weights).sum().item()
    mean_r, se_r = _mean_and_stderr(model, answer, "llada_released", repeats=400, n=8)
    assert abs(mean_r - released) < 4 * se_r and abs(mean_r - exact) > 4 * se_r, (mean_r, released, exact, se_r)
