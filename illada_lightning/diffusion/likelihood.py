"""The lower-variance Monte-Carlo conditional log-likelihood of LLaDA Eq. (6) (Appendix A.2, Eq. 14).

For an answer r0 of length L after a prompt p0: draw l ~ U{1..L}, mask exactly l answer tokens chosen
uniformly without replacement, and score (L / l) * sum over masked positions of log p(r0^i | p0, r_l).
Averaged over samples this estimates the NELBO-based log-likelihood bound (exact in expectation for a
model whose conditionals are consistent). As in LLaDA's released evaluation code, the l of one group of
Monte-Carlo samples are stratified: evenly spaced over 1..L from a random start, not drawn independently.

`stratified_mask_counts` is the one place the l are chosen (the scorer of `scoring.py` uses it too). Its default
("uniform") uses integer arithmetic so that every l in 1..L is equally likely for every sample, which keeps the
estimate unbiased. "llada_released" reproduces the released `eval_llada.py` (`torch.round` of a linspace): round
half to even favours even l whenever i * L / n ends in .5 (L = 4, n = 32: 7/32, 9/32, 7/32, 9/32), a bias that
depends on the candidate's length; keep it only to match published numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scoring_config import STRATIFICATIONS


def stratified_counts(lengths: torch.Tensor, index: torch.Tensor, group_size: torch.Tensor, start: torch.Tensor,
                      mode: str = "uniform") -> torch.Tensor:
    """Mask count l in 1..L of sample `index` (0-based) in a group of `group_size` samples with random `start`.

    Elementwise over long tensors. "uniform": l = (start - 1 + floor(index * L / n)) mod L + 1, a shift of the
    start, so over the L equally likely starts every l occurs exactly once (Eq. 6 as written).
    "llada_released": round(start + index * L / n) with round half to even, wrapped (biased, see module doc).
    """
    if mode == "uniform":
        return (start - 1 + torch.div(index * lengths, group_size, rounding_mode="floor")) % lengths + 1
    if mode == "llada_released":
        ls = torch.round(start.double() + index.double() * (lengths.double() / group_size.double())).long()
        return (ls - 1) % lengths + 1
    raise ValueError(f"mc_stratification must be one of {STRATIFICATIONS}, got {mode!r}")


def grouped_mask_counts(lengths: torch.Tensor, n_samples: torch.Tensor, group: int,
                        generator: torch.Generator | None = None, mode: str = "uniform") -> torch.Tensor:
    """Mask counts for `n_samples[c]` samples of every candidate c of length `lengths[c]`, stratified within
    consecutive groups of `group` samples, each group with its own uniform start in 1..L.

    Returns long [sum(n_samples)], candidate-major."""
    lengths, n_samples = lengths.long(), n_samples.long()
    cand = torch.repeat_interleave(torch.arange(len(lengths)), n_samples)
    first = torch.cumsum(n_samples, 0) - n_samples
    sample = torch.arange(int(n_samples.sum())) - first[cand]
    g = sample // group
    size = torch.clamp(n_samples[cand] - g * group, max=group)  # samples in this group
    n_groups = (n_samples + group - 1) // group
    group_id = (torch.cumsum(n_groups, 0) - n_groups)[cand] + g
    group_len = lengths.repeat_interleave(n_groups)
    start = (torch.rand(len(group_len), generator=generator, dtype=torch.float64) * group_len).long() + 1
    return stratified_counts(lengths[cand], sample % group, size, start[group_id], mode)


def stratified_mask_counts(n: int, length: int, generator: torch.Generator | None = None,
                           mode: str = "uniform") -> torch.Tensor:
    """One group of n mask counts for an answer of `length` tokens (see `grouped_mask_counts`)."""
    return grouped_mask_counts(torch.tensor([length]), torch.tensor([n]), n, generator, mode)


def mask_exactly(counts: torch.Tensor, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [n, length] with exactly counts[i] True per row, at uniformly random positions."""
    ranks = torch.rand(len(counts), length, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def guided_log_probs(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance (LLaDA Eq. 16): p^(1+w) / p_uncond^w, renormalised.

    Computed in float32 at least (float64 stays float64)."""
    cond = F.log_softmax(_upcast(cond_logits), dim=-1)
    if uncond_logits is None or cfg_scale == 0:
        return cond
    mixed = (1 + cfg_scale) * cond - cfg_scale * F.log_softmax(_upcast(uncond_logits), dim=-1)
    return F.log_softmax(mixed, dim=-1)


@torch.no_grad()
def mc_log_likelihood(
    model,
    prompt_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    *,
    mask_token_id: int,
    mc_samples: int = 128,
    mc_batch_size: int = 32,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
    return_samples: bool = False,
    mc_stratification: str = "uniform",
):
    """Monte-Carlo estimate of log p(answer | prompt) via Eq. 6 (higher is more likely).

    `model(ids [B, L]) -> logits [B, L, V]`. With `cfg_scale > 0` the unconditional branch (prompt fully
    masked) runs in the same batch. `mc_stratification` chooses the mask counts (see
    `stratified_counts`). Returns a float tensor (and the per-sample values if asked).
    """
    if answer_ids.numel() == 0:
        raise ValueError("cannot score an empty answer (zero tokens)")
    if mc_samples < 1 or mc_batch_size < 1:
        raise ValueError(f"mc_samples and mc_batch_size must be >= 1, got {mc_samples}, {mc_batch_size}")
    device = answer_ids.device
    P, L = prompt_ids.numel(), answer_ids.numel()
    full = torch.cat([prompt_ids, answer_ids]).to(device)
    values = []
    for done in range(0, mc_samples, mc_batch_size):
        n = min(mc_batch_size, mc_samples - done)
        counts = stratified_mask_counts(n, L, generator, mc_stratification)
        masked = mask_exactly(counts, L, generator).to(device)
        noisy = full.repeat(n, 1)
        noisy[:, P:][masked] = mask_token_id
        batch = noisy
        if cfg_scale:
            uncond = noisy.clone()
            uncond[:, :P] = mask_token_id
            batch = torch.cat([noisy, uncond])
        logits = model(batch)[:, P:]
        logp = guided_log_probs(logits[:n], logits[n:] if cfg_scale else None, cfg_scale)
        token_logp = logp.gather(-1, answer_ids.to(device).expand(n, L)[..., None]).squeeze(-1)
        values.append((token_logp * masked).sum(1) * (L / counts.to(device).double()))
    samples = torch.cat(values)
    estimate = samples.mean()
    return (estimate, samples) if return_samples else estimate
