"""LR schedules (iLLaDA §2.1 pretraining, §2.2 SFT): values at chosen steps, and the scheduler's state."""

import math

import pytest
import torch

from illada_lightning.training.schedule import RecipeLR, pretrain_lr, sft_decay_start, sft_lr

PEAK, MIN = 2e-4, 5e-6


def p(step, switch=None, warmup=100, decay=1000):
    return pretrain_lr(step, peak_lr=PEAK, min_lr=MIN, warmup_steps=warmup, decay_steps=decay, switch_step=switch)


def test_pretrain_warmup_then_constant_without_switch():
    assert p(0) == pytest.approx(PEAK / 100)
    assert p(49) == pytest.approx(PEAK * 50 / 100)
    assert p(99) == pytest.approx(PEAK)
    assert p(100) == p(10_000) == pytest.approx(PEAK)


def test_pretrain_cosine_after_switch():
    assert p(4999, switch=5000) == pytest.approx(PEAK)
    assert p(5000, switch=5000) == pytest.approx(PEAK)
    assert p(5500, switch=5000) == pytest.approx((PEAK + MIN) / 2)
    assert p(5250, switch=5000) == pytest.approx(MIN + (PEAK - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert p(6000, switch=5000) == pytest.approx(MIN)
    assert p(50_000, switch=5000) == pytest.approx(MIN)


def test_pretrain_switch_during_warmup_starts_decay_after_warmup():
    assert p(50, switch=10) == pytest.approx(PEAK * 51 / 100)  # still warming up
    assert p(100, switch=10) == pytest.approx(PEAK)
    assert p(600, switch=10) == pytest.approx((PEAK + MIN) / 2)


def test_sft_warmup_constant_linear_decay_over_last_tenth():
    kw = dict(peak_lr=5e-6, min_lr=5e-7, warmup_steps=10, total_steps=100, decay_fraction=0.1)
    assert sft_decay_start(100, 0.1) == 90
    assert sft_lr(0, **kw) == pytest.approx(5e-7)
    assert sft_lr(9, **kw) == pytest.approx(5e-6)
    assert sft_lr(89, **kw) == pytest.approx(5e-6)
    assert sft_lr(90, **kw) == pytest.approx(5e-6)
    assert sft_lr(95, **kw) == pytest.approx(5e-6 + (5e-7 - 5e-6) * 5 / 9)
    assert sft_lr(99, **kw) == pytest.approx(5e-7)
    assert sft_lr(0, **{**kw, "decay_fraction": 0.0}) == pytest.approx(5e-7)
    assert sft_lr(99, **{**kw, "decay_fraction": 0.0}) == pytest.approx(5e-6)


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def _run(sched, n):
    lrs = []
    for _ in range(n):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return lrs


def test_scheduler_follows_pure_function_and_keeps_switch_in_state():
    sched = RecipeLR(_opt(), kind="pretrain", peak_lr=PEAK, min_lr=MIN, warmup_steps=5, decay_steps=10)
    first = _run(sched, 8)
    assert first == pytest.approx([pretrain_lr(i, peak_lr=PEAK, min_lr=MIN, warmup_steps=5, decay_steps=10)
                                   for i in range(8)])
    sched.switch(8)
    sched.switch(12)  # ignored: one switch per run
    assert sched.switch_step == 8
    state, opt_state = sched.state_dict(), sched.optimizer.state_dict()
    restored = RecipeLR(_opt(), kind="pretrain", peak_lr=PEAK, min_lr=MIN, warmup_steps=5, decay_steps=10)
    restored.optimizer.load_state_dict(opt_state)  # as a checkpoint restore does
    restored.load_state_dict(state)
    assert restored.switch_step == 8
    assert _run(restored, 12) == pytest.approx(_run(sched, 12))
    assert restored.get_lr()[0] == pytest.approx(MIN)


def test_lr_scale_lowers_every_future_lr():
    sched = RecipeLR(_opt(), kind="sft", peak_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10)
    sched.set_lr_scale(0.5)
    assert _run(sched, 10) == pytest.approx([0.5] * 9 + [0.05])


def test_scheduler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        RecipeLR(_opt(), kind="sft", peak_lr=1.0, min_lr=0.1, warmup_steps=0)
    with pytest.raises(ValueError, match="kind"):
        RecipeLR(_opt(), kind="cosine", peak_lr=1.0, min_lr=0.1, warmup_steps=0)
    with pytest.raises(RuntimeError, match="pretraining"):
        RecipeLR(_opt(), kind="sft", peak_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=5).switch(3)
