"""The generation budget that fits a checkpoint: at most the context it was trained on, less the prompt.

A model trained on windows of L tokens (the default job fine-tunes on `sft.data.max_seq_len=128`, below the
`tiny` preset's 256) has never seen positions past L: a budget that pushes the answer beyond them gives
gibberish, and one that leaves no room for the prompt cannot run at all. `experiments.evaluate`,
`experiments.generate` and the main job's preview shorten such a budget to what fits, with a note, instead
of failing. No torch here: these are numbers read from the run's `config.yaml`.
"""

from __future__ import annotations

from pathlib import Path

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


def fit_budget(budget: int, steps: int, room: int, block_length: int | None = None) -> tuple[int, int]:
    """(budget, steps) with the budget cut to `room` tokens (rounded down to whole blocks when `block_length`
    is given, as fixed-length generation needs) and the steps scaled in proportion, so the same number of
    tokens is revealed per step; unchanged when the budget fits."""
    if budget <= room:
        return budget, steps
    new = max(1, room)
    if block_length:
        block = min(block_length, new)
        new = new // block * block
        n_blocks = new // block
        new_steps = max(n_blocks, steps * new // budget // n_blocks * n_blocks)
        return new, new_steps
    return new, max(1, steps * new // budget)


def budget_note(what: str, old: tuple[int, int], new: tuple[int, int], context: int, why: str) -> str:
    return (f"note: {what} {old[0]} -> {new[0]} (steps {old[1]} -> {new[1]}): the checkpoint was trained on "
            f"{context}-token sequences{why}")
