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
never materialise a vocabulary-sized row, and in chunks whose float32 logits are not kept for autograd
(`cross_entropy.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DiffusionConfig  # noqa: F401  (re-exported: its historical home)
from .cross_entropy import linear_cross_entropy


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar, the estimate of Eq. 1 per eligible token
    t: torch.Tensor  # [B] mask ratio per row
    masked: torch.Tensor  # [B, L] bool, positions that were masked
    n_masked: torch.Tensor  # scalar long
    masked_fraction: torch.Tensor  # scalar float: masked / eligible tokens
    row_loss: torch.Tensor | None = None  # [B] float, no gradient: each row's Eq. 1 estimate (`row_losses`)


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


def masked_token_weights(masked: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """Weight of each masked token (in `masked.nonzero()` order; `rows`: its row indices, if already computed)
    in the Eq. 1 estimate.

    Token i of row b weighs 1 / (t_b * n_eligible_b * n_rows), n_rows counting rows with at least one
    eligible token; the loss is sum_i weight_i * nll_i. `rows`: the row of each masked token, when the
    caller has it already (`masked.nonzero()` waits for the device).
    """
    n_eligible = eligible.sum(1).float()
    n_rows = (n_eligible > 0).sum().clamp(min=1)
    row_weight = 1.0 / (t.float() * n_eligible.clamp(min=1) * n_rows)
    return row_weight[masked.nonzero(as_tuple=True)[0] if rows is None else rows]


def row_losses(nll: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Each row's own Eq. 1 estimate, [B]: sum over its masked tokens of nll / (t_b * n_eligible_b), from the
    per-token `nll` of the masked tokens and their `rows`; 0 for a row with nothing eligible. The batch loss
    is the mean over the rows that have eligible tokens. Pure tensor work (no host sync)."""
    per_row = torch.zeros(t.shape[0], dtype=torch.float32, device=nll.device).index_add_(0, rows, nll.float())
    return per_row / (t.float() * eligible.sum(1).float().clamp(min=1))


def loss_by_mask_ratio(row_loss: torch.Tensor, t: torch.Tensor, rows_eligible: torch.Tensor | None = None,
                       n_bins: int = 5) -> torch.Tensor:
    """[2, n_bins] float64: the sum of the row losses and the number of rows whose mask ratio t falls in each
    bin [k/n_bins, (k+1)/n_bins) (t = 1 in the last), counting only `rows_eligible` (rows with a token that
    could be masked). Sums, so that micro-batches, log intervals and ranks add up before one division."""
    bins = (t.float() * n_bins).long().clamp_(0, n_bins - 1)
    weight = (torch.ones_like(row_loss, dtype=torch.float64) if rows_eligible is None
              else rows_eligible.to(torch.float64))
    out = torch.zeros(2, n_bins, dtype=torch.float64, device=row_loss.device)
    out[0].index_add_(0, bins, row_loss.to(torch.float64) * weight)
    out[1].index_add_(0, bins, weight)
    return out


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
    eligible = torch.ones_like(masked) if loss_mask is None else loss_mask
    rows, cols = masked.nonzero(as_tuple=True)  # the one wait for the device: how many tokens are masked
    # Nothing masked gives a zero loss that still reaches the parameters, so backward() works.
    loss, nll = linear_cross_entropy(
        hidden[rows, cols], model.output_weight, input_ids[rows, cols],
        masked_token_weights(masked, t, eligible, rows), cfg.loss_chunk_size, cfg.fused_loss,
    )
    n_masked = masked.sum()
    return DiffusionLoss(loss, t, masked, n_masked, n_masked / eligible.sum().clamp(min=1),
                         row_losses(nll.detach(), rows, t, eligible))
