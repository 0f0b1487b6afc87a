"""The masked-diffusion loss (iLLaDA Eq. 1) and the forward process."""

import math

import pytest
import torch
import torch.nn.functional as F

from illada_lightning import build_model
from illada_lightning.diffusion.objective import (
    DiffusionConfig,
    diffusion_loss,
    forward_process,
    loss_by_mask_ratio,
    masked_token_weights,
    sample_mask_ratio,
)

MASK = 3


class FixedLogits(torch.nn.Module):
    """A 'model' whose hidden state is a fixed per-position vector and whose LM head is the identity."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # [L, V] logits per position
        self.output_weight = torch.eye(table.shape[1])
        self.seen = None

    def hidden_states(self, ids, cu_seqlens=None, max_seqlen=None):
        self.seen = ids.clone()
        return self.table.expand(ids.shape[0], -1, -1)


def test_loss_equals_hand_computation():
    torch.manual_seed(0)
    L, V = 4, 5
    table = torch.randn(L, V)
    model = FixedLogits(table)
    ids = torch.tensor([[1, 4, 0, 2], [2, 2, 1, 0]])
    t = torch.tensor([0.5, 0.25])
    gen = torch.Generator().manual_seed(3)
    out = diffusion_loss(model, ids, mask_token_id=MASK, t=t, generator=gen)
    masked = out.masked
    logp = F.log_softmax(table, -1)
    expected = 0.0
    for b in range(2):
        row = sum(-logp[i, ids[b, i]].item() for i in range(L) if masked[b, i]) / t[b].item() / L
        expected += row / 2
    assert masked.any()
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    rows = [sum(-logp[i, ids[b, i]].item() for i in range(L) if masked[b, i]) / t[b].item() / L for b in range(2)]
    assert out.row_loss.tolist() == pytest.approx(rows, rel=1e-6)  # each row's own Eq. 1 estimate
    assert not out.row_loss.requires_grad
    # The model saw the mask token exactly at the masked positions and the clean tokens elsewhere.
    assert torch.equal(model.seen, torch.where(masked, torch.full_like(ids, MASK), ids))


def test_only_masked_positions_contribute():
    torch.manual_seed(0)
    table = torch.randn(6, 7)
    ids = torch.randint(0, 7, (1, 6))
    t = torch.tensor([0.5])
    gen = torch.Generator().manual_seed(1)
    base = diffusion_loss(FixedLogits(table), ids, mask_token_id=MASK, t=t, generator=gen)
    changed = table.clone()
    changed[~base.masked[0]] += 10 * torch.randn_like(changed[~base.masked[0]])
    gen = torch.Generator().manual_seed(1)
    again = diffusion_loss(FixedLogits(changed), ids, mask_token_id=MASK, t=t, generator=gen)
    assert torch.equal(base.masked, again.masked)
    assert again.loss.item() == pytest.approx(base.loss.item(), rel=1e-6)


def test_one_over_t_weighting():
    # Same masked set, t halved -> loss doubles.
    table = torch.randn(5, 6)
    ids = torch.randint(0, 6, (1, 5))
    masked = torch.tensor([[True, False, True, True, False]])
    nll = torch.rand(3)
    eligible = torch.ones_like(masked)
    a = (nll * masked_token_weights(masked, torch.tensor([0.8]), eligible)).sum()
    b = (nll * masked_token_weights(masked, torch.tensor([0.4]), eligible)).sum()
    assert b.item() == pytest.approx(2 * a.item())
    assert a.item() == pytest.approx(nll.sum().item() / 0.8 / 5)
    del table, ids


def test_loss_is_unbiased_estimate_of_mean_token_nll_for_time_free_model():
    # For a predictor whose output ignores the input, E_t,mask[1/t * sum_masked nll / L] = mean nll.
    torch.manual_seed(0)
    L, V = 8, 11
    table = torch.randn(L, V)
    ids = torch.randint(0, V, (4096, L))
    out = diffusion_loss(FixedLogits(table), ids, mask_token_id=MASK, config=DiffusionConfig(stratified_t=True),
                         generator=torch.Generator().manual_seed(0))
    exact = -F.log_softmax(table, -1).gather(1, ids.T).T.mean()
    assert out.loss.item() == pytest.approx(exact.item(), rel=0.05)


def test_loss_mask_keeps_tokens_visible_and_normalises_by_eligible_count():
    ids = torch.randint(4, 50, (2, 10))
    loss_mask = torch.zeros(2, 10, dtype=torch.bool)
    loss_mask[0, 6:] = True
    loss_mask[1, 3:] = True
    t = torch.ones(2)  # mask everything allowed
    noisy, masked = forward_process(ids, t, MASK, loss_mask)
    assert torch.equal(masked, loss_mask)
    assert torch.equal(noisy[~loss_mask], ids[~loss_mask])
    nll = torch.ones(int(masked.sum()))
    # each row: sum(1/t)/n_eligible = 1 -> mean 1
    assert (nll * masked_token_weights(masked, t, loss_mask)).sum().item() == pytest.approx(1.0)


def test_sample_mask_ratio_floor_and_stratification():
    t = sample_mask_ratio(1000, eps=0.1, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.1 and t.max() <= 1.0
    s = sample_mask_ratio(8, eps=0.0, stratified=True, generator=torch.Generator().manual_seed(0))
    assert sorted(int(x * 8) for x in s) == list(range(8))  # one draw per stratum


def test_mask_frequency_matches_t():
    ids = torch.zeros(200, 500, dtype=torch.long)
    t = torch.full((200,), 0.3)
    _, masked = forward_process(ids, t, MASK, generator=torch.Generator().manual_seed(0))
    p = masked.float().mean().item()
    assert abs(p - 0.3) < 4 * math.sqrt(0.3 * 0.7 / masked.numel())


def test_degenerate_batches_are_finite_and_backpropagate():
    model = build_model("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=40)
    ids = torch.randint(4, 40, (2, 6))
    for loss_mask in (torch.zeros(2, 6, dtype=torch.bool), None):  # nothing maskable / all masked (t=1)
        out = diffusion_loss(model, ids, mask_token_id=MASK, loss_mask=loss_mask, t=torch.ones(2))
        assert torch.isfinite(out.loss)
        out.loss.backward()
    one_token = diffusion_loss(model, ids[:, :1], mask_token_id=MASK, t=torch.ones(2))
    assert torch.isfinite(one_token.loss) and one_token.n_masked.item() == 2


def test_packed_batch_loss_runs_and_counts():
    model = build_model("tiny", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=40)
    ids = torch.randint(4, 40, (2, 8))
    cu = torch.tensor([0, 3, 8, 16], dtype=torch.int32)
    out = diffusion_loss(model, ids, mask_token_id=MASK, cu_seqlens=cu, max_seqlen=8,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.masked_fraction.item() == out.n_masked.item() / 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_matches_reference_values_and_grads(dtype):
    from illada_lightning.diffusion.cross_entropy import linear_cross_entropy, reference_linear_cross_entropy

    torch.manual_seed(0)
    h0, w0 = torch.randn(37, 16, dtype=dtype), torch.randn(50, 16)
    tgt, tw = torch.randint(0, 50, (37,)), torch.rand(37)
    results = []
    for fn in (lambda h, w: linear_cross_entropy(h, w, tgt, tw, chunk_size=8),
               lambda h, w: reference_linear_cross_entropy(h, w, tgt, tw)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss, nll = fn(h, w)
        (3.0 * loss).backward()
        results.append((loss.detach(), nll, h.grad.float(), w.grad))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_fused_softmax_gradient_is_the_eager_one_in_float32_arithmetic():
    """`softmax_grad` (what `fused_loss=true` compiles) against the in-place eager passes, on bf16 logits."""
    from illada_lightning.diffusion.cross_entropy import _eager_softmax_grad, softmax_grad

    g = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(9, 300, generator=g)).to(torch.bfloat16)
    tgt, tw = torch.randint(0, 300, (9,), generator=g), torch.rand(9, generator=g)
    nll, grad = softmax_grad(logits, tgt, tw)
    nll_e, grad_e = _eager_softmax_grad(logits, tgt, tw, torch.bfloat16)
    assert grad.dtype == torch.bfloat16 and nll.dtype == torch.float32
    torch.testing.assert_close(nll, nll_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), grad_e.float(), atol=0, rtol=0)  # same float32 math, one rounding
    ref = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="none")
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    # the gradient of sum_i w_i * nll_i, by autograd on float32 logits
    lf = logits.float().requires_grad_()
    (torch.nn.functional.cross_entropy(lf, tgt, reduction="none") * tw).sum().backward()
    torch.testing.assert_close(grad.float(), lf.grad, atol=4e-3, rtol=1e-2)


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_loss_under_bf16_autocast_and_with_a_bf16_head(monkeypatch, fused):
    """bf16-mixed (float32 weights, autocast) and bf16-true (bf16 weights): the reference's values and
    gradients within bf16 rounding; several chunks accumulate the head gradient; a bf16 head gets a bf16 one."""
    from illada_lightning.diffusion import cross_entropy as ce

    if fused:  # the compiled kernel is the GPU test's job: here the same function runs eagerly
        monkeypatch.setattr(ce, "_compiled_softmax_grad", lambda: ce.softmax_grad)
    g = torch.Generator().manual_seed(5)
    h0, w0 = torch.randn(41, 32, generator=g), 0.3 * torch.randn(70, 32, generator=g)
    tgt, tw = torch.randint(0, 70, (41,), generator=g), torch.rand(41, generator=g)
    for weight_dtype, autocast in ((torch.float32, True), (torch.bfloat16, False)):
        results = []
        for fn in (lambda h, w: ce.linear_cross_entropy(h, w, tgt, tw, chunk_size=16, fused=fused),
                   lambda h, w: ce.reference_linear_cross_entropy(h, w, tgt, tw)):
            h = h0.to(weight_dtype).clone().requires_grad_()
            w = w0.to(weight_dtype).clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss, nll = fn(h, w)
            (2.0 * loss).backward()
            results.append((loss.detach().float(), nll.float(), h.grad.float(), w.grad))
        assert results[0][3].dtype == weight_dtype
        for got, want in zip(*results):
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_loss_by_mask_ratio_bins_rows_by_t_against_a_hand_computation():
    # Rows with t in [0, .2), [.2, .4), ..., [.8, 1] (t = 1 in the last bin); the padding-only row is left out.
    row_loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    t = torch.tensor([0.05, 0.19, 0.2, 0.55, 1.0, 0.81, 0.3])
    eligible = torch.tensor([True, True, True, True, True, True, False])
    out = loss_by_mask_ratio(row_loss, t, eligible)
    assert out.dtype == torch.float64 and out.shape == (2, 5)
    assert out[0].tolist() == [1 + 2, 3, 4, 0, 5 + 6]
    assert out[1].tolist() == [2, 1, 1, 0, 2]
    # Summed over micro-batches and divided once: the mean row loss per bin of the log interval.
    total = out + loss_by_mask_ratio(torch.tensor([9.0]), torch.tensor([0.1]))
    assert (total[0] / total[1]).tolist()[:3] == pytest.approx([(1 + 2 + 9) / 3, 3.0, 4.0])


def test_row_losses_average_to_the_batch_loss_with_a_loss_mask():
    torch.manual_seed(0)
    table = torch.randn(6, 9)
    ids = torch.randint(4, 9, (3, 6))
    loss_mask = torch.ones(3, 6, dtype=torch.bool)
    loss_mask[1, :4] = False  # a prompt
    loss_mask[2] = False  # nothing eligible: row loss 0, and not part of the mean
    out = diffusion_loss(FixedLogits(table), ids, mask_token_id=MASK, loss_mask=loss_mask, t=torch.tensor([0.9, 1.0, 0.5]),
                         generator=torch.Generator().manual_seed(2))
    assert out.row_loss[2].item() == 0.0
    assert out.loss.item() == pytest.approx(out.row_loss[:2].mean().item(), rel=1e-6)
