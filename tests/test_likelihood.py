"""LLaDA Eq. 6: the lower-variance Monte-Carlo conditional log-likelihood."""

import itertools
import math

import pytest
import torch

from illada_lightning.diffusion.likelihood import mask_exactly, mc_log_likelihood, stratified_mask_counts

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
