"""Block KV caching and confidence-aware parallel decoding (issue 17) against the exact sampler."""

from __future__ import annotations

import pytest
import torch

from illada_lightning import build_model
from illada_lightning.diffusion.packed_inference import cu_seqlens_from_lengths
from illada_lightning.diffusion.sampler import generate, reveal_above_threshold, reveal_step
from illada_lightning.model.kv_cache import cached_hidden_states, cross_layout, full_layout

MASK, EOS = 3, 2
PROMPTS = [[5, 17, 99, 4], [7, 8], [40, 41, 42, 43, 44, 45, 46]]


def _model(n_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", n_layers=n_layers, init_std=0.1, attention_backend="sdpa").double().eval()


@pytest.fixture(scope="module")
def one_layer():
    # One layer: keys/values are a function of each token and its position only, so the cached keys/values
    # of tokens that do not change during a block are exactly what a full forward would compute.
    return _model(1)


@pytest.fixture(scope="module")
def two_layers():
    return _model(2)


def test_cached_forward_with_unchanged_tokens_equals_full_forward(two_layers):
    lens = torch.tensor([5, 9, 3])
    ids = torch.randint(5, 100, (int(lens.sum()),), generator=torch.Generator().manual_seed(0))
    cu = cu_seqlens_from_lengths(lens)
    with torch.no_grad():
        ref = two_layers.hidden_states(ids, cu, 9)
        full, kv = cached_hidden_states(two_layers, ids, full_layout(lens, "cpu"))
        # Recompute the last two tokens of every sequence against the cache of the same tokens.
        idx = torch.cat([torch.arange(int(e) - 2, int(e)) for e in cu[1:]])
        row_of = torch.full((ids.numel(),), -1)
        row_of[idx] = torch.arange(idx.numel())
        key_src = torch.where(row_of >= 0, ids.numel() + row_of, torch.arange(ids.numel()))
        positions = torch.cat([torch.arange(int(n) - 2, int(n)) for n in lens])
        part, _ = cached_hidden_states(two_layers, ids[idx], cross_layout(torch.full((3,), 2), lens, positions, "cpu"),
                                       key_src, kv)
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(part, ref[idx], rtol=0, atol=1e-12)


def test_cached_step_equals_a_plain_forward_with_stale_keys_and_values(two_layers, monkeypatch):
    """The slow twin of a cached step: a full forward on the new tokens in which every layer's keys/values of
    the cached positions are replaced by those of the forward that filled the cache (what the cache means)."""
    from illada_lightning.diffusion.block_cache import CachedPack
    from illada_lightning.model.transformer import Attention

    lens = torch.tensor([6, 9, 4])
    g = torch.Generator().manual_seed(1)
    before = torch.randint(5, 100, (int(lens.sum()),), generator=g)
    cu = cu_seqlens_from_lengths(lens)
    recompute = torch.zeros(before.numel(), dtype=torch.bool)
    for start, n in zip(cu[:-1].tolist(), lens.tolist()):
        recompute[start + n - 3: start + n] = True  # the last three tokens of every sequence
    now = torch.where(recompute, torch.randint(5, 100, before.shape, generator=g), before)
    with torch.no_grad():
        pack = CachedPack(two_layers, lens, recompute, torch.zeros_like(recompute), MASK, 0.0, "cpu")
        pack.full(before)
        fwd = pack.step(now)
        got = fwd.features[fwd.row_of[recompute.nonzero()[:, 0]]]

        project, captured = Attention.project, []

        def capture(self, x, cos, sin):
            q, k, v = project(self, x, cos, sin)
            captured.append((k.clone(), v.clone()))
            return q, k, v

        monkeypatch.setattr(Attention, "project", capture)
        two_layers.hidden_states(before, cu, int(lens.max()))
        stale = iter(captured)

        def replace(self, x, cos, sin):
            q, k, v = project(self, x, cos, sin)
            old_k, old_v = next(stale)
            return q, torch.where(recompute[None, :, None, None], k, old_k), torch.where(
                recompute[None, :, None, None], v, old_v)

        monkeypatch.setattr(Attention, "project", replace)
        want = two_layers.hidden_states(now, cu, int(lens.max()))[recompute]
        monkeypatch.setattr(Attention, "project", project)
        exact = two_layers.hidden_states(now, cu, int(lens.max()))[recompute]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert float((got - exact).abs().max()) > 1e-6  # with two layers the cache is an approximation


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_cache_equals_no_cache_when_cached_keys_do_not_change(one_layer, cache, cfg_scale):
    opts = dict(gen_length=16, steps=16, block_length=4, cfg_scale=cfg_scale)
    exact = generate(one_layer, PROMPTS, **opts)
    assert generate(one_layer, PROMPTS, cache=cache, **opts) == exact


@pytest.mark.parametrize("confidence_eos_inf", [False, True])
def test_variable_length_and_eos_with_cache_equal_exact_when_cache_is_exact(one_layer, confidence_eos_inf):
    opts = dict(variable_length=True, max_new_tokens=16, steps=16, block_length=4)
    eos = generate(one_layer, PROMPTS, eos_token_id=None, **opts)[0][5]  # a mid-answer token becomes the end
    opts.update(eos_token_id=eos, confidence_eos_inf=confidence_eos_inf)
    exact = generate(one_layer, PROMPTS, **opts)
    assert any(len(r) < 16 for r in exact)  # generation did stop at the end token
    for cache in ("prefix", "dual"):
        assert generate(one_layer, PROMPTS, cache=cache, **opts) == exact


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_approximation_error_is_reported(two_layers, cache):
    """With two layers the cache is an approximation: report the token agreement with exact decoding."""
    opts = dict(gen_length=16, steps=16, block_length=4, eos_token_id=None)
    exact = generate(two_layers, PROMPTS, **opts)
    cached = generate(two_layers, PROMPTS, cache=cache, **opts)
    agreement = _agreement(exact, cached)
    print(f"cache={cache}: token agreement with exact decoding {agreement:.3f}")
    assert all(len(r) == 16 for r in cached) and 0.0 <= agreement <= 1.0
    # The first step of every block is a full forward: the first token revealed in each block is exact
    # only if the blocks before agree, so at least the first block's first token must agree.
    assert agreement > 0.0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_batched_equals_one_by_one_with_cache(two_layers, cache):
    opts = dict(gen_length=12, steps=12, block_length=4, cache=cache, parallel="threshold", threshold=0.05)
    batched = generate(two_layers, PROMPTS, **opts)
    assert batched == [generate(two_layers, p, **opts) for p in PROMPTS]


def test_variable_length_with_cache_and_threshold_runs_and_respects_budget(two_layers):
    for cache in ("none", "prefix", "dual"):
        out = generate(two_layers, PROMPTS, variable_length=True, max_new_tokens=10, block_length=4, steps=12,
                       cache=cache, parallel="threshold", threshold=0.5)
        assert all(len(r) <= 10 for r in out)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_above_every_confidence_equals_one_token_per_step(two_layers, cache):
    opts = dict(gen_length=12, steps=12, block_length=4, cache=cache)
    one_per_step = generate(two_layers, PROMPTS, **opts)
    assert generate(two_layers, PROMPTS, parallel="threshold", threshold=1.0, **opts) == one_per_step


def test_reveal_above_threshold_reveals_at_least_k_and_everything_above():
    g = torch.Generator().manual_seed(0)
    block = torch.full((4, 8), MASK)
    block[1, :5] = 9  # a row with only three masks left
    proposed = torch.randint(10, 20, (4, 8), generator=g)
    confidence = torch.rand(4, 8, generator=g, dtype=torch.float64)
    confidence[2] = 0.01  # nothing above the threshold: still k revealed
    out = reveal_above_threshold(block, proposed, confidence, 2, 0.6, MASK)
    newly = (block == MASK) & (out != MASK)
    for r in range(4):
        above = int(((confidence[r] > 0.6) & (block[r] == MASK)).sum())
        assert int(newly[r].sum()) == min(max(2, above), int((block[r] == MASK).sum()))
        assert bool((out[r][newly[r]] == proposed[r][newly[r]]).all())
    assert bool((out[block != MASK] == block[block != MASK]).all())  # revealed tokens never change
    # Threshold >= 1 reveals exactly what the one-size-fits-all top-k step reveals (rows without ties).
    rows = [0, 3]
    assert torch.equal(reveal_above_threshold(block[rows], proposed[rows], confidence[rows], 3, 1.0, MASK),
                       reveal_step(block[rows], proposed[rows], confidence[rows], 3, MASK))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_every_step_reveals_at_least_one_token_and_never_beyond_the_block(two_layers, cache, monkeypatch):
    import illada_lightning.diffusion.sampler as sampler
    from illada_lightning.diffusion.packed_inference import segment_positions

    reveals, canvases = [], []
    original_reveal, original_forward = sampler.reveal_above_threshold, sampler.BlockForward

    def spy_reveal(block, *args, **kwargs):
        out = original_reveal(block, *args, **kwargs)
        reveals.append((block.clone(), out.clone()))
        return out

    class SpyForward(original_forward):
        def __init__(self, model, seq_lens, prompt_lens, start, length, *args):
            super().__init__(model, seq_lens, prompt_lens, start, length, *args)
            seq, local = segment_positions(seq_lens)
            self.beyond = local >= prompt_lens[seq] + start + length

        def __call__(self, x):
            canvases.append(x[self.beyond].clone())
            return super().__call__(x)

    monkeypatch.setattr(sampler, "reveal_above_threshold", spy_reveal)
    monkeypatch.setattr(sampler, "BlockForward", SpyForward)
    out = generate(two_layers, PROMPTS, gen_length=12, steps=6, block_length=4, cache=cache, parallel="threshold",
                   threshold=0.2, eos_token_id=None)
    assert reveals and all(len(r) == 12 for r in out)
    for before, after in reveals:
        newly = ((before == MASK) & (after != MASK)).sum(-1)
        assert bool((newly[(before == MASK).any(-1)] >= 1).all())  # >= 1 token per unfinished row and step
    assert len(canvases) <= 6  # never more steps than the schedule
    assert all(bool((c == MASK).all()) for c in canvases)  # nothing after the current block is revealed


def _fast_dllm_factor_count(conf: list[float], factor: float) -> int:
    """How many tokens Fast-dLLM's `get_transfer_index_dynamic` reveals for one row's masked confidences, written
    from its loop (thresholds 1 - factor / (n + 1), the first forced), without its last-position quirk."""
    ordered = sorted(conf, reverse=True)
    for i, c in enumerate(ordered):
        if i > 0 and c < 1 - factor / (i + 2):
            return i
    return len(ordered)


def test_factor_rule_reveals_the_longest_prefix_under_its_rising_threshold():
    block = torch.full((1, 4), MASK)
    proposed = torch.tensor([[10, 11, 12, 13]])
    conf = torch.tensor([[0.8, 0.99, 0.5, 0.9]], dtype=torch.float64)
    # sorted 0.99, 0.9, 0.8, 0.5: (n + 1)(1 - c_n) = 0.02 (forced), 0.3, 0.8, 2.5
    for factor, revealed in ((1.0, [10, 11, MASK, 13]), (0.5, [MASK, 11, MASK, 13]), (3.0, [10, 11, 12, 13])):
        out = reveal_above_threshold(block, proposed, conf, 1, 0.9, MASK, factor=factor)
        assert out[0].tolist() == revealed, factor
    assert reveal_above_threshold(block, proposed, conf, 3, 0.9, MASK, factor=0.01)[0].tolist() == [10, 11, MASK, 13]
    # random rows, some positions already revealed: the count of the released algorithm's loop, at least k
    g = torch.Generator().manual_seed(1)
    block = torch.full((64, 16), MASK)
    block[torch.rand(64, 16, generator=g) < 0.3] = 9
    conf = 1 - torch.rand(64, 16, generator=g, dtype=torch.float64) ** 3 * 0.5
    proposed = torch.randint(10, 20, (64, 16), generator=g)
    for factor in (0.5, 1.0, 2.0):
        out = reveal_above_threshold(block, proposed, conf, 2, 0.9, MASK, factor=factor)
        for r in range(64):
            masked = block[r] == MASK
            want = min(max(2, _fast_dllm_factor_count(conf[r][masked].tolist(), factor)), int(masked.sum()))
            newly = masked & (out[r] != MASK)
            assert int(newly.sum()) == want
            if 0 < want < int(masked.sum()):  # the most confident ones went first
                assert conf[r][newly].min() >= conf[r][masked & ~newly].max()


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_factor_rule_in_the_sampler(two_layers, cache):
    opts = dict(gen_length=12, steps=12, block_length=4, cache=cache, eos_token_id=None)
    one_per_step = generate(two_layers, PROMPTS, **opts)
    # a factor so small that only the forced first token passes: one token per step, as exact decoding
    assert generate(two_layers, PROMPTS, parallel="factor", factor=1e-12, **opts) == one_per_step
    fast = generate(two_layers, PROMPTS, parallel="factor", factor=50.0, **opts)  # everything passes at once
    assert all(len(r) == 12 for r in fast)
    # cuda_graph is a CUDA replay of the same step: on the CPU it changes nothing
    assert generate(two_layers, PROMPTS, parallel="factor", factor=1.0, cuda_graph=True, **opts) == generate(
        two_layers, PROMPTS, parallel="factor", factor=1.0, **opts)


@pytest.mark.parametrize("options,match", [
    (dict(parallel="factor", factor=0.0), "factor must be > 0"),
    (dict(cache="full"), "cache must be one of"),
    (dict(parallel="always"), "parallel must be one of"),
    (dict(parallel="threshold", threshold=0.0), "threshold must be > 0"),
    (dict(parallel="threshold", remasking="random"), "needs remasking=low_confidence"),
])
def test_bad_fast_decoding_options(two_layers, options, match):
    with pytest.raises(ValueError, match=match):
        generate(two_layers, PROMPTS[0], gen_length=4, steps=4, **options)


def test_cache_needs_a_mask_predictor():
    class Plain(torch.nn.Module):
        def forward(self, ids, cu_seqlens=None, max_seqlen=None):
            return torch.zeros(ids.numel(), 8)

    with pytest.raises(ValueError, match="cache='dual' needs a MaskPredictor"):
        generate(Plain(), [5, 6], gen_length=4, steps=4, cache="dual", mask_token_id=MASK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_varlen_cached_forward_matches_full_forward_and_generates():
    torch.manual_seed(0)
    model = build_model("tiny", n_layers=2, init_std=0.1, attention_backend="auto").cuda().to(torch.bfloat16).eval()
    lens = torch.tensor([5, 9, 3])
    ids = torch.randint(5, 100, (int(lens.sum()),), generator=torch.Generator().manual_seed(0)).cuda()
    cu = cu_seqlens_from_lengths(lens).cuda()
    with torch.no_grad():
        ref = model.hidden_states(ids, cu, 9).float()
        full, kv = cached_hidden_states(model, ids, full_layout(lens, "cuda"))
        idx = torch.cat([torch.arange(int(e) - 2, int(e)) for e in cu[1:].cpu()])
        row_of = torch.full((ids.numel(),), -1)
        row_of[idx] = torch.arange(idx.numel())
        key_src = torch.where(row_of >= 0, ids.numel() + row_of, torch.arange(ids.numel())).cuda()
        positions = torch.cat([torch.arange(int(n) - 2, int(n)) for n in lens])
        part, _ = cached_hidden_states(model, ids[idx.cuda()], cross_layout(torch.full((3,), 2), lens, positions, "cuda"),
                                       key_src, kv)
    torch.testing.assert_close(full.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(part.float(), ref[idx.cuda()], rtol=0.05, atol=0.05)
    prompts = [torch.tensor(p, device="cuda") for p in PROMPTS]
    for cache in ("prefix", "dual"):
        out = generate(model, prompts, gen_length=16, steps=16, block_length=4, cache=cache, parallel="threshold",
                       threshold=0.5, eos_token_id=None)
        assert [len(r) for r in out] == [16] * len(PROMPTS)
