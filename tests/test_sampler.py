"""The diffusion sampler against direct implementations of LLaDA Algorithms 4-5 and iLLaDA §2.3."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from illada_lightning import build_model
from illada_lightning.diffusion.likelihood import guided_log_probs
from illada_lightning.diffusion.sampler import (
    SamplerConfig,
    chat_turn,
    generate,
    generate_batch,
    sampler_config,
    think_boost,
    transfer_schedule,
)

MASK, EOS = 3, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float64 + a wider init: logits far from ties, so fast and reference paths agree exactly.
    return build_model("tiny", n_layers=2, init_std=0.1, attention_backend="sdpa").double().eval()


class Recorder(nn.Module):
    """Wraps a model, records every packed input (ids, cu_seqlens) it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids, cu_seqlens=None, max_seqlen=None):
        self.calls.append((ids.clone(), cu_seqlens.clone()))
        return self.inner(ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def docs(self, call: int) -> list[torch.Tensor]:
        ids, cu = self.calls[call]
        bounds = cu.tolist()
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class TableModel(nn.Module):
    """Toy predictor: logits at a token depend only on (its position in its document, whether it is masked).

    `eos_at`: document position from which EOS is overwhelmingly likely.
    """

    def __init__(self, vocab=16, max_len=64, eos_at=None, seed=0, scale=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = scale * torch.randn(max_len, vocab, generator=g, dtype=torch.float64)
        self.table[:, EOS] = -10.0
        if eos_at is not None:
            self.table[eos_at:, EOS] = 50.0
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(mask_token_id=MASK, eos_token_id=EOS, max_seq_len=max_len)

    def forward(self, ids, cu_seqlens=None, max_seqlen=None):
        doc = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(ids.numel()), right=True)
        pos = torch.arange(ids.numel()) - cu_seqlens.long()[doc]
        return self.table[pos]


# --------------------------------------------------------------------------------------------------
# A direct transcription of LLaDA Algorithm 5 (greedy, low-confidence remasking), blockwise.


@torch.no_grad()
def algorithm5(model, prompt, gen_length, steps, block_length, cfg_scale=0.0):
    P = len(prompt)
    x = torch.tensor(list(prompt) + [MASK] * gen_length)
    n_blocks = gen_length // block_length
    N = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        for k in range(N):  # t = 1 - k/N, s = t - 1/N
            logits = model(x[None])[0].double()
            if cfg_scale:
                uncond = x.clone()
                uncond[:P] = MASK
                logits = guided_log_probs(logits, model(uncond[None])[0], cfg_scale).double()
            logits[:, MASK] = float("-inf")
            probs = logits.softmax(-1)
            r0, c = x.clone(), {}
            for i in range(lo, hi):
                if x[i] != MASK:
                    c[i] = math.inf  # already revealed: never remasked
                else:
                    r0[i] = int(probs[i].argmax())
                    c[i] = float(probs[i, r0[i]])
            n_un = block_length * (k + 1) // N  # floor(L (1 - s)) unmasked in this block at time s
            keep = sorted(c, key=lambda i: -c[i])[:n_un]
            for i in range(lo, hi):
                x[i] = r0[i] if i in keep else MASK
    out = x[P:].tolist()
    return out[: out.index(EOS)] if EOS in out else out


@pytest.mark.parametrize("gen_length,steps,block_length", [(12, 12, 12), (12, 6, 12), (12, 6, 4), (16, 8, 8)])
def test_greedy_low_confidence_equals_algorithm5(model, gen_length, steps, block_length):
    prompt = [5, 17, 99, 250, 7]
    got = generate(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length)
    assert got == algorithm5(model, prompt, gen_length, steps, block_length)


def test_cfg_equals_reference_and_zero_scale_is_plain(model):
    prompt = [5, 17, 99, 250]
    got = generate(model, prompt, steps=8, gen_length=8, block_length=4, cfg_scale=1.5)
    assert got == algorithm5(model, prompt, 8, 8, 4, cfg_scale=1.5)
    plain = generate(model, prompt, steps=8, gen_length=8)
    assert generate(model, prompt, steps=8, gen_length=8, cfg_scale=0.0) == plain


def test_cfg_runs_both_branches_in_one_forward(model):
    rec = Recorder(model)
    generate(rec, [[5, 6, 7], [8, 9]], steps=2, gen_length=4, cfg_scale=1.0)
    assert len(rec.calls) == 2  # one forward per step for both prompts and both branches
    docs = rec.docs(0)
    assert len(docs) == 4
    assert docs[0][:3].tolist() == [5, 6, 7] and docs[2][:3].tolist() == [MASK] * 3  # unconditional: prompt masked
    assert torch.equal(docs[0][3:], docs[2][3:])


def test_blocks_never_reveal_beyond_current_block(model):
    rec = Recorder(model)
    P, bl, spb = 3, 4, 2
    generate(rec, [5, 6, 7], steps=6, gen_length=12, block_length=bl, logits_eos_inf=True)
    assert len(rec.calls) == 6
    for call in range(6):
        block = call // spb
        response = rec.docs(call)[0][P:]
        assert (response[(block + 1) * bl :] == MASK).all(), f"step {call} saw a token beyond block {block}"
        assert (response[: block * bl] != MASK).all(), f"step {call}: earlier blocks must be decoded"


def test_steps_equal_gen_length_reveals_one_token_per_step(model):
    rec = Recorder(model)
    out = generate(rec, [5, 6, 7], steps=10, gen_length=10, logits_eos_inf=True)
    masks = [int((rec.docs(c)[0] == MASK).sum()) for c in range(len(rec.calls))]
    assert masks == list(range(10, 0, -1))
    assert len(out) == 10 and MASK not in out


def test_transfer_schedule_is_linear_and_exhaustive():
    assert transfer_schedule(12, 4) == [3, 3, 3, 3]
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    for n, s in [(7, 7), (32, 5), (1, 1)]:
        sched = transfer_schedule(n, s)
        assert sum(sched) == n and max(sched) - min(sched) <= 1


def test_batched_generation_equals_one_by_one(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16]]
    opts = dict(steps=8, gen_length=8, block_length=4)
    assert generate(model, prompts, **opts) == [generate(model, p, **opts) for p in prompts]
    opts = dict(steps=12, variable_length=True, max_new_tokens=10, block_length=4)
    assert generate(model, prompts, **opts) == [generate(model, p, **opts) for p in prompts]


def test_tensor_and_list_inputs_agree(model):
    opts = dict(steps=4, gen_length=4)
    assert generate(model, torch.tensor([5, 6, 7]), **opts) == generate(model, [5, 6, 7], **opts)
    assert generate(model, torch.tensor([[5, 6, 7]]), **opts) == [generate(model, [5, 6, 7], **opts)]


def test_greedy_is_deterministic_and_sampling_is_seeded(model):
    opts = dict(steps=8, gen_length=8)
    assert generate(model, [5, 6], **opts) == generate(model, [5, 6], **opts)
    a = generate(model, [5, 6], temperature=1.0, seed=1, **opts)
    assert a == generate(model, [5, 6], temperature=1.0, seed=1, **opts)
    assert a != generate(model, [5, 6], temperature=1.0, seed=2, **opts)


def test_random_remasking_reveals_uniform_positions_and_exact_counts():
    toy = TableModel()
    rec = Recorder(toy)
    n = 400
    generate(rec, [[5, 6]] * n, steps=4, gen_length=4, remasking="random", seed=0, mask_token_id=MASK)
    first = torch.stack([d[2:] != MASK for d in rec.docs(1)])  # after step 1
    assert (first.sum(1) == 1).all()  # exactly one token per step (4 masks / 4 steps)
    counts = first.sum(0).double()
    chi2 = float(((counts - n / 4) ** 2 / (n / 4)).sum())
    assert chi2 < 16.3, f"revealed positions not uniform: {counts.tolist()}"  # p = 0.001 for 3 dof
    lowconf = Recorder(toy)
    generate(lowconf, [[5, 6]] * 8, steps=4, gen_length=4, mask_token_id=MASK)
    assert len({tuple(d.tolist()) for d in lowconf.docs(1)}) == 1  # low confidence: deterministic


def test_gumbel_sampling_matches_softmax_at_temperature():
    toy = TableModel(vocab=6, scale=1.0)
    n, temp = 6000, 0.7
    outs = generate(toy, [[5]] * n, steps=1, gen_length=1, temperature=temp, seed=0, mask_token_id=MASK)
    logits = toy.table[1].clone()
    logits[MASK] = float("-inf")
    expected = (logits / temp).softmax(-1)
    freq = torch.bincount(torch.tensor([o[0] if o else EOS for o in outs]), minlength=6).double() / n
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / n))


def test_fixed_length_drops_tokens_after_eos():
    toy = TableModel(eos_at=5)  # document position 5 = response position 3 after a 2-token prompt
    out = generate(toy, [5, 6], steps=8, gen_length=8, mask_token_id=MASK, eos_token_id=EOS)
    assert len(out) == 3 and EOS not in out


def test_variable_length_stops_at_first_block_with_eos():
    toy = TableModel(eos_at=2 + 6)  # response position 6: in the second block of 4
    rec = Recorder(toy)
    cfg = sampler_config(steps=20, variable_length=True, max_new_tokens=20, block_length=4,
                         mask_token_id=MASK, eos_token_id=EOS)
    out = generate_batch(rec, [torch.tensor([5, 6])], cfg)[0]
    assert out.token_ids == generate(toy, [5, 6], steps=20, gen_length=20, block_length=4,
                                     mask_token_id=MASK)[:6]
    assert len(out.token_ids) == 6 and out.finish_reason == "eos"
    assert out.n_forward == 8 and len(rec.calls) == 8  # two blocks of 4 steps, then stop
    assert max(len(d) for c in range(8) for d in rec.docs(c)) == 2 + 8  # only one block of masks at a time


def test_variable_length_never_exceeds_max_new_tokens():
    toy = TableModel()  # never emits EOS
    rec = Recorder(toy)
    cfg = sampler_config(steps=9, variable_length=True, max_new_tokens=10, block_length=4, mask_token_id=MASK)
    out = generate_batch(rec, [torch.tensor([5, 6])], cfg)[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    assert max(len(d) for c in range(len(rec.calls)) for d in rec.docs(c)) == 2 + 10
    assert len(rec.calls) == 3 + 3 + 2  # last block of 2 tokens takes min(3, 2) steps


def test_variable_length_batch_finished_sequences_stop_growing():
    toy = TableModel(eos_at=2 + 5)  # prompt of 2 -> EOS in block 2; prompt of 5 -> position 2, block 1
    rec = Recorder(toy)
    cfg = sampler_config(steps=16, variable_length=True, max_new_tokens=16, block_length=4, mask_token_id=MASK)
    outs = generate_batch(rec, [torch.tensor([5, 6]), torch.tensor([5, 6, 7, 8, 9])], cfg)
    assert [len(o.token_ids) for o in outs] == [5, 2]
    assert [o.n_forward for o in outs] == [8, 4]
    assert [len(rec.docs(c)) for c in range(len(rec.calls))] == [2] * 4 + [1] * 4


def test_stop_tokens_and_stop_strings():
    toy = TableModel()
    full = generate(toy, [5, 6], steps=8, gen_length=8, mask_token_id=MASK)
    stop = full[4]
    out = generate(toy, [5, 6], steps=8, gen_length=8, mask_token_id=MASK, stop_token_ids=[stop])
    assert out == full[: full.index(stop)]
    decode = lambda ids: "".join(chr(ord("a") + t) for t in ids)  # noqa: E731
    target = decode(full[3:5])
    out = generate(toy, [5, 6], steps=8, gen_length=8, variable_length=True, block_length=4,
                   mask_token_id=MASK, stop_strings=[target], decode=decode)
    assert target in decode(out) and target not in decode(out[:-1])
    with pytest.raises(ValueError, match="decode"):
        generate(toy, [5, 6], steps=8, gen_length=8, mask_token_id=MASK, stop_strings=["x"])


def test_think_boost_schedule_and_effect():
    cfg = SamplerConfig(think_end_token_id=8, think_boost_max=4.0, think_boost_start=10, think_boost_ramp=20)
    assert [think_boost(cfg, g) for g in (0, 10, 20, 30, 100)] == [0.0, 0.0, 2.0, 4.0, 4.0]
    toy = TableModel()
    toy.table[:, 8] = -5.0  # never chosen unless boosted
    base = generate(toy, [5, 6], steps=12, gen_length=12, block_length=4, mask_token_id=MASK)
    assert 8 not in base
    out = generate(toy, [5, 6], steps=12, variable_length=True, max_new_tokens=12, block_length=4,
                   mask_token_id=MASK, think_end_token_id=8, think_boost_max=100.0, think_boost_start=3,
                   think_boost_ramp=1)
    assert 8 not in out[:4]  # no boost before 3 tokens exist (block 1 starts at 0)
    assert out[4:8] == [8] * 4  # block 2 starts at 4 >= 3 + ramp: full boost
    assert 8 not in out[8:]  # the token has appeared: boost off


def test_confidence_eos_inf_reveals_eos_last():
    toy = TableModel(eos_at=2 + 1)  # EOS is the most confident proposal from response position 1 on
    rec = Recorder(toy)
    generate(rec, [5, 6], steps=6, gen_length=6, mask_token_id=MASK, confidence_eos_inf=True)
    revealed_first = rec.docs(1)[0][2:]
    assert (revealed_first == EOS).sum() == 0 and (revealed_first != MASK).sum() == 1
    assert EOS not in generate(toy, [5, 6], steps=6, gen_length=6, mask_token_id=MASK, logits_eos_inf=True)


def test_too_many_steps_is_clamped_with_same_output(model):
    opts = dict(gen_length=8, block_length=4)
    assert generate(model, [5, 6], steps=16, **opts) == generate(model, [5, 6], steps=8, **opts)


def test_chat_turn_extends_history(model):
    turn = chat_turn(model, [5, 6, 7], steps=8, max_new_tokens=8, block_length=4)
    assert turn.history_ids == [5, 6, 7] + turn.reply_ids + [EOS]
    assert turn.finish_reason in ("eos", "length")


@pytest.mark.parametrize(
    "prompt,options,error,match",
    [
        ([], {}, ValueError, "empty"),
        ([[5, 6], []], {}, ValueError, "prompt 1 is empty"),
        ([5, MASK, 6], {}, ValueError, "mask token"),
        (list(range(10, 200)), {"gen_length": 128}, ValueError, "max_seq_len"),
        ([5], {"gen_length": 10, "block_length": 4, "steps": 10}, ValueError, "not a multiple of block_length"),
        ([5], {"gen_length": 12, "block_length": 4, "steps": 10}, ValueError, "does not divide"),
        ([5], {"remasking": "lowest"}, ValueError, "remasking"),
        ([5], {"temperature": -1.0}, ValueError, "temperature"),
        ([5], {"max_new_tokens": 8}, ValueError, "variable_length"),
        ([5], {"n_steps": 8}, TypeError, "n_steps"),
    ],
)
def test_bad_input_errors(model, prompt, options, error, match):
    with pytest.raises(error, match=match):
        generate(model, prompt, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_packed_batch_equals_one_by_one_and_bf16_runs():
    torch.manual_seed(0)
    gpu = build_model("tiny", n_layers=2, init_std=0.2, device="cuda").eval()
    prompts = [[5, 6, 7], list(range(10, 40)), [15, 16]]
    opts = dict(steps=16, gen_length=16, block_length=8, logits_eos_inf=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert generate(gpu, prompts, precision="fp32", **opts) == [generate(gpu, p, precision="fp32", **opts)
                                                                for p in prompts]
    out = generate(gpu, prompts, cfg_scale=1.0, temperature=0.5, seed=0, **opts)  # bf16 autocast, varlen
    assert [len(o) for o in out] == [16, 16, 16]
