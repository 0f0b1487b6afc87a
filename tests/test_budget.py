"""One generation-budget rule (`budget.fit_sampler`) for `experiments.generate`, `experiments.evaluate` and the
main job's preview: given the same sampler settings and the same room, all three shorten to the same budget
and steps, and the result always runs (steps divide over the blocks). `generate` once had its own arithmetic,
and evaluation's variable-length cut could give steps the sampler refused."""

from types import SimpleNamespace

import pytest

from experiments.generate import GenerateConfig, sampler_options
from illada_lightning.budget import fit_budget, fit_sampler
from illada_lightning.config import load_config
from illada_lightning.diffusion.sampler_config import SamplerConfig
from illada_lightning.evaluation.cli import EvaluateConfig, fit_generation_budget
from illada_lightning.training.config import TrainingConfig
from illada_lightning.training.preview import preview_sampler

PROMPT = 10  # prompt tokens (generate, preview); evaluation's room is half the context whatever the prompt

CASES = [  # (sampler keys, room)
    (dict(variable_length=True, max_new_tokens=256, steps=256, block_length=32), 70),  # the closing note's case
    (dict(variable_length=True, max_new_tokens=128, steps=128, block_length=4), 107),
    (dict(variable_length=True, max_new_tokens=300, steps=150, block_length=None), 61),
    (dict(variable_length=False, gen_length=256, steps=256, block_length=32), 64),
    (dict(variable_length=False, gen_length=256, steps=64, block_length=32), 100),
    (dict(variable_length=False, gen_length=128, steps=128, block_length=None), 50),
    (dict(variable_length=True, max_new_tokens=64, steps=64, block_length=8), 200),  # fits: unchanged
]


def overrides(prefix: str, keys: dict) -> list[str]:
    return [f"{prefix}{k}={'null' if v is None else str(v).lower()}" for k, v in keys.items()]


def via_generate(keys: dict, room: int) -> SamplerConfig:
    cfg = load_config(GenerateConfig, None, ["ckpt=README.md", "prompt=x", *overrides("sampler.", keys)])
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=10_000))
    return SamplerConfig(**sampler_options(model, PROMPT, cfg, context=room + PROMPT))


def via_evaluate(keys: dict, room: int) -> SamplerConfig:
    cfg = load_config(EvaluateConfig, None, ["ckpt=x", *overrides("sampler.", keys)])
    fit_generation_budget(cfg, context=2 * room)
    return cfg.sampler


def via_preview(keys: dict, room: int) -> SamplerConfig:
    cfg = load_config(TrainingConfig, None, [f"sft.data.max_seq_len={room + PROMPT}",
                                             *overrides("preview.sampler.", keys)])
    return preview_sampler(cfg, PROMPT)


@pytest.mark.parametrize(("keys", "room"), CASES)
def test_generate_evaluate_and_preview_fit_a_budget_alike(keys, room):
    fitted = [via_generate(keys, room), via_evaluate(keys, room), via_preview(keys, room)]
    shapes = {(s.budget, s.steps, s.resolved_block_length, s.n_blocks) for s in fitted}
    assert len(shapes) == 1, shapes
    (budget, steps, block, n_blocks), = shapes
    original = SamplerConfig(**keys)
    assert budget == min(original.budget, room) or (not original.variable_length and budget == room // block * block)
    assert budget <= room and steps % n_blocks == 0
    for sampler in fitted:
        sampler.validate()  # the sampler runs these settings
    if original.budget > room:  # tokens per step kept (rounded up to whole blocks of steps)
        assert steps / budget >= original.steps / original.budget - 1e-9
        assert steps - n_blocks < original.steps * budget / original.budget


def test_the_closing_notes_case_now_runs():
    """Evaluate, variable length, cut to 70 tokens in blocks of 32: the old rule gave 70 steps over 3 blocks."""
    sampler, what = fit_sampler(SamplerConfig(variable_length=True, max_new_tokens=256, steps=256,
                                              block_length=32), 70)
    assert what == "sampler.max_new_tokens" and (sampler.max_new_tokens, sampler.steps) == (70, 72)
    assert fit_budget(256, 256, 70, 32) == (70, 72) and fit_budget(256, 256, 70, 32, whole_blocks=True) == (64, 64)
