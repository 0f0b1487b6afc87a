"""Memory-lean cross-entropy through the LM head, for the masked positions only.

The vocabulary is large (126-155k for the 8B presets), so full logits dominate activation memory. The
objective gathers the hidden states of masked positions first (unmasked positions never get logits), and
this function walks them in chunks: each chunk's logits live only inside the loop. When gradients are
needed they are computed in the same pass (softmax minus one-hot, times the token's weight) and stored
for backward, so no chunk's float32 logits are kept for autograd — peak extra memory is one chunk of
logits instead of `n_masked x vocab` float32 values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, chunk_size):
        n = hidden.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        w = weight.to(hidden.dtype)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            h, tgt = hidden[sl], targets[sl]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll[sl] = lse - logits.gather(1, tgt[:, None]).squeeze(1)
            if grad_hidden is not None or grad_weight is not None:
                # d(sum_i w_i * nll_i)/d logits = w_i * (softmax - onehot)
                g = torch.exp(logits.sub_(lse[:, None]))
                g[torch.arange(g.shape[0], device=g.device), tgt] -= 1.0
                g = (g * token_weight[sl, None]).to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[sl] = g @ w
                if grad_weight is not None:
                    grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else weight.new_empty(0),
        )
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll)
        return (nll * token_weight).sum(), nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.has[0] else None
        gw = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    chunk_size: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i token_weight_i * nll_i, nll) for hidden [N, D], LM head weight [V, D], targets [N].

    `nll` is -log softmax(hidden @ weight.T)[target] in float32 and carries no gradient.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float(), hidden.new_zeros(0, dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, token_weight.float(), chunk_size)
    w = weight.to(hidden.dtype)
    nll = torch.cat([
        F.cross_entropy((hidden[i : i + chunk_size] @ w.t()).float(), targets[i : i + chunk_size], reduction="none")
        for i in range(0, hidden.shape[0], chunk_size)
    ])
    return (nll * token_weight.float()).sum(), nll


def reference_linear_cross_entropy(hidden, weight, targets, token_weight):
    """The plain version (full logits kept for autograd) that tests compare against."""
    nll = F.cross_entropy((hidden @ weight.to(hidden.dtype).t()).float(), targets, reduction="none")
    return (nll * token_weight).sum(), nll.detach()
