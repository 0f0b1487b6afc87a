"""Fast confidence scoring (issue 17 item 3): a context KV cache and threshold reveals against exact Eq. 2."""

from __future__ import annotations

import pytest
import torch

from illada_lightning import build_model
from illada_lightning.diffusion.scoring import score_batch

ITEMS = [
    ([5, 17, 99], [[40, 41], [42], [43, 44, 45, 46]]),
    ([7, 8, 9, 10, 11, 12], [[50, 51, 52], [53, 54, 55]]),
    ([13], [[60], [61, 62, 63, 64, 65], [66, 67]]),
]


def _model(n_layers: int):
    torch.manual_seed(0)
    return build_model("tiny", n_layers=n_layers, init_std=0.1, attention_backend="sdpa").double().eval()


@pytest.fixture(scope="module")
def one_layer():
    return _model(1)  # keys/values of the context do not depend on the candidate: the cache is exact


@pytest.fixture(scope="module")
def two_layers():
    return _model(2)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_confidence_scoring_equals_exact_when_context_keys_do_not_change(one_layer, cfg_scale):
    exact = score_batch(one_layer, ITEMS, cfg_scale=cfg_scale)
    cached = score_batch(one_layer, ITEMS, cfg_scale=cfg_scale, cache="context")
    for e, c in zip(exact, cached):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-10)


def test_cached_scoring_is_invariant_to_batch_composition(two_layers):
    together = score_batch(two_layers, ITEMS, cache="context")
    alone = [score_batch(two_layers, [item], cache="context")[0] for item in ITEMS]
    small_batches = score_batch(two_layers, ITEMS, cache="context", max_tokens_per_batch=8)
    for t, a, s in zip(together, alone, small_batches):
        torch.testing.assert_close(t, a, rtol=0, atol=1e-10)
        torch.testing.assert_close(t, s, rtol=0, atol=1e-10)


def test_cache_approximation_error_is_reported(two_layers):
    exact = score_batch(two_layers, ITEMS)
    cached = score_batch(two_layers, ITEMS, cache="context")
    error = max(float((e - c).abs().max()) for e, c in zip(exact, cached))
    agree = sum(int(e.argmax()) == int(c.argmax()) for e, c in zip(exact, cached)) / len(ITEMS)
    print(f"context cache: max |score error| {error:.4f}, argmax agreement {agree:.2f}")
    assert all(torch.isfinite(c).all() for c in cached)


@pytest.mark.parametrize("cache", ["none", "context"])
def test_threshold_above_every_probability_equals_one_token_per_step(two_layers, cache):
    one = score_batch(two_layers, ITEMS, cache=cache)
    for a, b in zip(one, score_batch(two_layers, ITEMS, cache=cache, parallel="threshold", threshold=1.0)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache", ["none", "context"])
def test_low_threshold_reveals_everything_in_one_step(two_layers, cache):
    """threshold -> 0: the first step reveals every token, so the score is the sum of the all-masked log-probs."""
    items = [([5, 17, 99], [[40, 41, 42, 43]])]
    got = score_batch(two_layers, items, cache=cache, parallel="threshold", threshold=1e-300)[0]
    with torch.no_grad():
        x = torch.tensor([5, 17, 99, 3, 3, 3, 3])
        logp = two_layers(x[None])[0].double().log_softmax(-1)
        want = sum(float(logp[3 + i, t]) for i, t in enumerate([40, 41, 42, 43]))
    if cache == "none":
        assert float(got[0]) == pytest.approx(want, abs=1e-10)
    assert torch.isfinite(got).all()


def test_exact_mode_is_the_default_and_unchanged(two_layers):
    default = score_batch(two_layers, ITEMS)
    explicit = score_batch(two_layers, ITEMS, cache="none", parallel="off")
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options,match", [
    (dict(cache="full"), "cache must be one of"),
    (dict(parallel="yes"), "parallel must be one of"),
    (dict(threshold=-1.0), "threshold must be > 0"),
])
def test_bad_fast_scoring_options(two_layers, options, match):
    with pytest.raises(ValueError, match=match):
        score_batch(two_layers, ITEMS, **options)
