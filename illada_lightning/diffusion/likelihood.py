"""The lower-variance Monte-Carlo conditional log-likelihood of LLaDA Eq. (6) (Appendix A.2, Eq. 14).

For an answer r0 of length L after a prompt p0: draw l ~ U{1..L}, mask exactly l answer tokens chosen
uniformly without replacement, and score (L / l) * sum over masked positions of log p(r0^i | p0, r_l).
Averaged over samples this estimates the NELBO-based log-likelihood bound (exact in expectation for a
model whose conditionals are consistent). As in LLaDA's released evaluation code, the l of one
Monte-Carlo batch are stratified: evenly spaced over 1..L from a random offset, not drawn independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stratified_mask_counts(n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n values of l in {1..length}: evenly spaced (step length/n) from a uniform random start, wrapped."""
    start = torch.randint(1, length + 1, (1,), generator=generator).item()
    ls = torch.round(start + torch.arange(n, dtype=torch.float64) * (length / n)).long()
    return (ls - 1) % length + 1


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
):
    """Monte-Carlo estimate of log p(answer | prompt) via Eq. 6 (higher is more likely).

    `model(ids [B, L]) -> logits [B, L, V]`. With `cfg_scale > 0` the unconditional branch (prompt fully
    masked) runs in the same batch. Returns a float tensor (and the per-sample values if asked).
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
        counts = stratified_mask_counts(n, L, generator)
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
