"""The generation budget that fits a checkpoint: at most the context it was trained on, less the prompt.

A model trained on windows of L tokens (the default job fine-tunes on `sft.data.max_seq_len=128`, below the
`tiny` preset's 256) has never seen positions past L: a budget that pushes the answer beyond them gives
gibberish, and one that leaves no room for the prompt cannot run at all. `experiments.evaluate`,
`experiments.generate` and the main job's preview shorten such a budget to what fits (one rule, `fit_sampler`),
with a note, instead of failing. Each says how much room an answer gets: `generate` the trained context less
its prompt, `evaluate` half the trained context (prompts are cut from the left to the rest), the preview the
SFT window less its longest prompt. No torch here: these are numbers read from the run's `config.yaml`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from .diffusion.sampler_config import SamplerConfig
from .runs import CONFIG_FILE as RUN_CONFIG  # written into every run directory by training


def trained_context(ckpt: str | Path, model_max_len: int) -> int:
    """Longest sequence the checkpoint was trained on: `max_seq_len` of the stage that produced it (read from
    its run's config.yaml; the `pretrain/` or `sft/` part of the path picks the stage, else the last stage
    run), never more than the model's own context; the model's context when no run config is found."""
    from omegaconf import OmegaConf

    path = Path(ckpt).resolve()
    for run_dir in [path, *path.parents][:4]:
        config_file = run_dir / RUN_CONFIG
        if not config_file.is_file():
            continue
        config = OmegaConf.load(config_file)
        if OmegaConf.select(config, "pretrain.data.max_seq_len") is None:
            continue  # some other config.yaml (not a training run's)
        parts = path.relative_to(run_dir).parts
        stage = "pretrain" if "pretrain" in parts or OmegaConf.select(config, "stage") == "pretrain" else "sft"
        length = OmegaConf.select(config, f"{stage}.data.max_seq_len") or model_max_len
        return min(int(length), model_max_len)
    return model_max_len


def fit_budget(budget: int, steps: int, room: int, block_length: int, *, whole_blocks: bool = False
               ) -> tuple[int, int]:
    """The one budget rule: (budget, steps) cut to `room` tokens, unchanged when the budget fits.

    The budget becomes `room` (rounded down to whole blocks of `block_length` with `whole_blocks`, as
    fixed-length generation needs; variable-length generation shortens its last block instead). The steps
    keep the tokens revealed per step, rounded up to a multiple of the number of blocks, because the sampler
    splits them evenly across blocks (`SamplerConfig.validate`)."""
    if budget <= room:
        return budget, steps
    new = max(1, room)
    block = max(1, min(block_length, new))
    if whole_blocks:
        new = new // block * block
    n_blocks = math.ceil(new / block)
    return new, max(1, math.ceil(steps * new / budget / n_blocks)) * n_blocks


def fit_sampler(sampler: SamplerConfig, room: int) -> tuple[SamplerConfig, str | None]:
    """`sampler` with its budget (`max_new_tokens` with `variable_length`, else `gen_length`) fitted to `room`
    tokens by `fit_budget`, and the key it changed (None: it fits, `sampler` is returned as is).
    `experiments.generate`, `experiments.evaluate` and the main job's preview all fit through here."""
    if sampler.budget <= room:
        return sampler, None
    block = sampler.resolved_block_length
    budget, steps = fit_budget(sampler.budget, sampler.steps, room, block, whole_blocks=not sampler.variable_length)
    if sampler.variable_length:
        fitted = replace(sampler, max_new_tokens=budget, steps=steps)
        what = "sampler.max_new_tokens"
    else:
        fitted = replace(sampler, gen_length=budget, steps=steps, block_length=min(block, budget))
        what = "sampler.gen_length"
    return fitted.validate(), what


def budget_note(what: str, old: tuple[int, int], new: tuple[int, int], context: int, why: str) -> str:
    return (f"note: {what} {old[0]} -> {new[0]} (steps {old[1]} -> {new[1]}): the checkpoint was trained on "
            f"{context}-token sequences{why}")
