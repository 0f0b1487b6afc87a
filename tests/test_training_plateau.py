"""The plateau LR switch: exactly once on a plateau, never on a falling loss, kept across save/load."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger

from illada_lightning import runs
from illada_lightning.training.callbacks import LossPlateauLRSwitch
from illada_lightning.training.config import ScheduleConfig
from illada_lightning.training.plateau import PlateauDetector
from illada_lightning.training.schedule import RecipeLR


def plateau_curve(n_fall=300, n_flat=600, seed=0):
    rng = np.random.default_rng(seed)
    fall = np.linspace(6.0, 3.0, n_fall)
    flat = np.full(n_flat, 3.0)
    return np.concatenate([fall, flat]) + rng.normal(0, 0.3, n_fall + n_flat)  # noisy like t ~ U[0, 1]


def falling_curve(n=900, seed=1):
    rng = np.random.default_rng(seed)
    return 3.0 + 3.0 * np.exp(-np.arange(n) / 1000) + rng.normal(0, 0.3, n)


def first_trigger(detector, curve):
    return next((step for step, loss in enumerate(curve) if detector.update(step, float(loss))), None)


@pytest.mark.parametrize("smoothing", ["ema", "window"])
def test_detector_fires_after_the_plateau_starts(smoothing):
    det = PlateauDetector(smoothing=smoothing, ema_decay=0.98, window=50, patience=100, min_delta=0.05)
    step = first_trigger(det, plateau_curve())
    assert step is not None and 300 + 100 <= step <= 300 + 250


@pytest.mark.parametrize("smoothing", ["ema", "window"])
def test_detector_never_fires_on_a_falling_loss(smoothing):
    det = PlateauDetector(smoothing=smoothing, ema_decay=0.98, window=50, patience=100, min_delta=0.05)
    assert first_trigger(det, falling_curve()) is None


def test_detector_waits_for_min_steps_and_ignores_nan():
    det = PlateauDetector(patience=5, min_delta=0.0, min_steps=100)
    assert first_trigger(det, [1.0] * 100) is None
    assert det.update(100, float("nan")) is False
    assert det.n_seen == 100


def fake_trainer(scheduler, loggers=()):
    return SimpleNamespace(global_step=0, lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
                           loggers=list(loggers), is_global_zero=True)


class RecordingLogger(MLFlowLogger):
    """What the callback sends to MLflow (metrics with their step, tags of the run), with no store."""

    def __init__(self):  # no MLflow client: nothing is written
        self.metrics, self.tags = [], {}

    @property
    def experiment(self):
        return SimpleNamespace(set_tag=lambda run_id, key, value: self.tags.__setitem__(key, value))

    @property
    def run_id(self):
        return "run"

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def make_scheduler(switch_step=None):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return RecipeLR(opt, kind="pretrain", peak_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=100,
                    switch_step=switch_step)


def drive(callback, trainer, curve, start=0):
    """Feed one micro-batch per optimizer step through the callback, as Lightning does."""
    module = SimpleNamespace(last_loss=None)
    for i, loss in enumerate(curve, start=start):
        module.last_loss = float(loss)
        trainer.global_step = i + 1  # after the optimizer step of batch i
        callback.on_train_batch_end(trainer, module, None, None, i)


SCHEDULE = ScheduleConfig(smoothing="ema", ema_decay=0.98, patience=100, min_delta=0.05, decay_steps=100)


def test_callback_switches_exactly_once_and_keeps_state():
    sched = make_scheduler()
    cb = LossPlateauLRSwitch(SCHEDULE, warmup_steps=10)
    trainer = fake_trainer(sched)
    curve = plateau_curve()
    drive(cb, trainer, curve[:600])
    switch = cb.switch_step
    assert switch is not None and sched.switch_step == switch and 400 <= switch <= 560
    state = cb.state_dict()

    # A later plateau (or the same one) never switches again.
    drive(cb, trainer, curve[600:], start=600)
    assert cb.switch_step == switch == sched.switch_step

    # Save/load: a resumed run knows it has switched and keeps the detector's statistics.
    restored = LossPlateauLRSwitch(SCHEDULE, warmup_steps=10)
    restored.load_state_dict(state)
    assert restored.switch_step == switch and restored.detector.best == cb.detector.best
    sched2 = make_scheduler(switch_step=switch)
    drive(restored, fake_trainer(sched2), curve[600:], start=600)
    assert restored.switch_step == switch and sched2.switch_step == switch


def test_callback_does_not_switch_on_a_falling_loss():
    sched = make_scheduler()
    cb = LossPlateauLRSwitch(SCHEDULE, warmup_steps=10)
    drive(cb, fake_trainer(sched), falling_curve())
    assert cb.switch_step is None and sched.switch_step is None


def test_manual_switch_at_step_overrides_the_detector():
    cfg = ScheduleConfig(switch_at_step=50, patience=5, min_delta=10.0)  # the detector alone would fire early
    sched = make_scheduler(switch_step=50)
    cb = LossPlateauLRSwitch(cfg)
    drive(cb, fake_trainer(sched), [1.0] * 100)
    assert cb.switch_step == 50 and sched.switch_step == 50


def test_the_switch_is_an_event_logged_once_at_its_step_and_tagged_on_the_run():
    logger = RecordingLogger()
    cb = LossPlateauLRSwitch(SCHEDULE, warmup_steps=10)
    drive(cb, fake_trainer(make_scheduler(), [logger]), plateau_curve())
    switch = cb.switch_step
    assert switch is not None
    events = [(step, m) for step, m in logger.metrics if runs.LR_SWITCH_STEP in m]
    assert events == [(switch, {runs.LR_SWITCH_STEP: float(switch), runs.LR_SWITCH_LOSS: cb.switch_loss})]
    assert logger.tags[runs.LR_SWITCH_TAG] == str(switch)
    assert float(logger.tags[runs.LR_SWITCH_LOSS_TAG]) == pytest.approx(cb.switch_loss, abs=1e-6)
    # A resumed attempt (a new run) gets the tag at its start, and no second event.
    resumed, new_run = LossPlateauLRSwitch(SCHEDULE, warmup_steps=10), RecordingLogger()
    resumed.load_state_dict(cb.state_dict())
    trainer = fake_trainer(make_scheduler(switch_step=switch), [new_run])
    resumed.on_train_start(trainer, None)
    drive(resumed, trainer, plateau_curve()[:50], start=850)
    assert new_run.tags[runs.LR_SWITCH_TAG] == str(switch) and new_run.metrics == []
