"""The masked-diffusion training objective shared by pretraining and SFT (iLLaDA Eq. 1, LLaDA Eq. 3/5).

Forward process: draw a mask ratio t ~ U[0, 1] per packed row (floored at `eps` so the 1/t weight stays
bounded), then mask every token independently with probability t (LLaDA Eq. 7-8). The loss is the
cross-entropy of the clean token at masked positions only, weighted by 1/t.

Normalisation. Each row's weighted sum is divided by the number of tokens that *could* be masked in that
row (all real tokens in pretraining; the response tokens under LLaDA-style `loss_mask`), and rows are
averaged. For full pretraining rows this is LLaDA Algorithm 1's 1/(t·L) normalisation, an unbiased
per-token estimate of the NELBO (Eq. 1 / L); dividing by the number of *masked* tokens instead would bias
it. With `loss_mask` it is LLaDA Algorithm 2 / Appendix B.1's normalisation by answer length.

Logits are computed only for masked positions (hidden states are gathered first), so unmasked positions
never materialise a vocabulary-sized row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DiffusionConfig:
    mask_eps: float = 1e-3  # t = eps + (1 - eps) * u keeps 1/t <= 1/eps
    stratified_t: bool = False  # low-discrepancy t across the batch: u_i = (i + U) / B
    loss_chunk_size: int = 8192  # masked positions per cross-entropy chunk

    def validate(self) -> DiffusionConfig:
        if not 0.0 <= self.mask_eps < 1.0:
            raise ValueError(f"diffusion.mask_eps must be in [0, 1), got {self.mask_eps}")
        if self.loss_chunk_size <= 0:
            raise ValueError(f"diffusion.loss_chunk_size must be positive, got {self.loss_chunk_size}")
        return self


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar, the estimate of Eq. 1 per eligible token
    t: torch.Tensor  # [B] mask ratio per row
    masked: torch.Tensor  # [B, L] bool, positions that were masked
    n_masked: torch.Tensor  # scalar long
    masked_fraction: torch.Tensor  # scalar float: masked / eligible tokens


def sample_mask_ratio(
    n: int, *, eps: float = 1e-3, stratified: bool = False, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t in [eps, 1] for `n` rows. Stratified: one uniform draw per stratum [i/n, (i+1)/n), shuffled."""
    u = torch.rand(n, generator=generator, device=device)
    if stratified:
        perm = torch.randperm(n, generator=generator, device=device)
        u = (perm.to(u.dtype) + u) / n
    return eps + (1.0 - eps) * u


def forward_process(
    input_ids: torch.Tensor,
    t: torch.Tensor,
    mask_token_id: int,
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of row b independently with probability t[b] (LLaDA Eq. 7-8).

    `loss_mask` (bool [B, L]) marks the tokens that may be masked; the others stay visible (the prompt in
    LLaDA-style SFT, padding). Returns (noisy_ids, masked).
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = u < t.to(u.dtype)[:, None]
    if loss_mask is not None:
        masked &= loss_mask
    return torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids), masked


def masked_token_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """-log p(target) for gathered hidden states [N, D] through the LM head [V, D], in float32 chunks."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = F.linear(hidden[start : start + chunk_size], weight).float()
        out.append(F.cross_entropy(logits, targets[start : start + chunk_size], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def weighted_diffusion_loss(
    token_nll: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor
) -> torch.Tensor:
    """Eq. 1 estimate from per-masked-token NLLs (in `masked.nonzero()` order).

    Row b contributes sum_i 1[masked] * nll_i / t_b divided by its eligible-token count; rows with no
    eligible token are left out of the mean.
    """
    row = masked.nonzero(as_tuple=True)[0]
    per_row = torch.zeros(masked.shape[0], dtype=torch.float32, device=masked.device)
    per_row.index_add_(0, row, token_nll / t.float()[row])
    n_eligible = eligible.sum(1).float()
    has = n_eligible > 0
    return (per_row[has] / n_eligible[has]).sum() / has.sum().clamp(min=1)


def diffusion_loss(
    model,
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    loss_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    config: DiffusionConfig | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """One Monte-Carlo estimate of Eq. 1 for a batch of packed rows [B, L].

    `model` must provide `hidden_states(ids, cu_seqlens, max_seqlen)` and `output_weight` (MaskPredictor).
    """
    cfg = config or DiffusionConfig()
    B = input_ids.shape[0]
    if t is None:
        t = sample_mask_ratio(B, eps=cfg.mask_eps, stratified=cfg.stratified_t, generator=generator,
                              device=input_ids.device)
    noisy, masked = forward_process(input_ids, t, mask_token_id, loss_mask, generator)
    hidden = model.hidden_states(noisy, cu_seqlens, max_seqlen)
    nll = masked_token_nll(hidden[masked], model.output_weight, input_ids[masked], cfg.loss_chunk_size)
    eligible = torch.ones_like(masked) if loss_mask is None else loss_mask
    loss = weighted_diffusion_loss(nll, masked, t, eligible)
    if nll.numel() == 0:  # nothing masked: a zero that still reaches the parameters, so backward() works
        loss = loss + 0.0 * hidden.sum()
    n_masked = masked.sum()
    return DiffusionLoss(loss, t, masked, n_masked, n_masked / eligible.sum().clamp(min=1))
