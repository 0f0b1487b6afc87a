"""Memory-lean cross-entropy through the LM head, for the masked positions only.

The vocabulary is large (126-155k for the 8B presets), so full logits dominate activation memory. The
objective gathers the hidden states of masked positions first (unmasked positions never get logits), and
this function walks them in chunks: each chunk's logits live only inside the loop. When gradients are
needed they are computed in the same pass (softmax minus one-hot, times the token's weight) and stored
for backward, so no chunk's float32 logits are kept for autograd — peak extra memory is one chunk of
logits instead of `n_masked x vocab` float32 values.

The matmuls run in the compute dtype (the autocast dtype under bf16-mixed, else the hidden states' dtype):
hidden states and head weight are cast once, and the chunk's gradient is cast once, instead of autocast
re-casting a float32 [chunk, vocab] gradient for each of the two backward matmuls (same values, fewer bytes).
`fused=True` computes the chunk's softmax, NLL and gradient from the low-precision logits in two kernels
compiled by torch.compile (`softmax_grad`), instead of ~8 eager passes over a float32 [chunk, vocab] copy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, token_weight: torch.Tensor):
    """(nll, grad): nll_i = logsumexp(l_i) - l_i[t_i] in float32, grad = w_i * (softmax(l_i) - onehot(t_i)) in
    the logits' dtype. Float32 arithmetic whatever the logits' dtype; compiled, the two reads of `logits`
    and the one write of `grad` are all the memory traffic."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    nll = lse - lf.gather(1, targets[:, None]).squeeze(1)
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]
    grad = (torch.exp(lf - lse[:, None]) - onehot.float()) * token_weight[:, None]
    return nll, grad.to(logits.dtype)


@functools.cache
def _compiled_softmax_grad():
    return torch.compile(softmax_grad)


def _eager_softmax_grad(logits, targets, token_weight, out_dtype):
    """The same as `softmax_grad`, op by op in place on one float32 copy (the unfused path)."""
    lf = logits.float()
    del logits
    lse = torch.logsumexp(lf, dim=-1)
    nll = lse - lf.gather(1, targets[:, None]).squeeze(1)
    # d(sum_i w_i * nll_i)/d logits = w_i * (softmax - onehot)
    g = lf.sub_(lse[:, None]).exp_()
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    return nll, g.mul_(token_weight[:, None]).to(out_dtype)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of `t` in (t's own dtype when autocast is off)."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind) and t.is_floating_point():
        return torch.get_autocast_dtype(kind)
    return t.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weight, chunk_size, fused):
        n = hidden.shape[0]
        dtype = compute_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = None
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = h[sl] @ w.t()
            if fused:
                nll[sl], g = _compiled_softmax_grad()(logits, targets[sl], token_weight[sl])
            else:
                nll[sl], g = _eager_softmax_grad(logits, targets[sl], token_weight[sl], dtype)
            del logits
            if grad_hidden is not None:
                grad_hidden[sl] = g @ w
            if weight.requires_grad:
                gw = g.t() @ h[sl]
                # Chunks are summed in float32 (a single chunk of a low-precision head needs no float32 copy);
                # the first one needs no zero-filled accumulator.
                if grad_weight is None:
                    single = n <= chunk_size and weight.dtype != torch.float32
                    grad_weight = gw if single else gw.float()
                else:
                    grad_weight.add_(gw)
        if grad_weight is not None and weight.dtype != torch.float32 and grad_weight.dtype == torch.float32:
            # A low-precision head (bf16-true) gets its gradient in its own dtype anyway: keep that, not the
            # float32 sum, alive until backward (half the bytes of a [vocab, d_model] matrix).
            grad_weight = grad_weight.to(weight.dtype)
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
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weight: torch.Tensor,
    chunk_size: int = 8192,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i token_weight_i * nll_i, nll) for hidden [N, D], LM head weight [V, D], targets [N].

    `nll` is -log softmax(hidden @ weight.T)[target] in float32 and carries no gradient. `fused`: the chunk's
    softmax gradient through torch.compile (GPU training; same numbers to float32 rounding).
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float(), hidden.new_zeros(0, dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, token_weight.float(), chunk_size, fused)
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
