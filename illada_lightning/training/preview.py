"""A few generated answers from the final SFT model, printed after training (`diffusion.sampler.generate`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ..budget import fit_sampler
from ..data.corpus import read_jsonl_records, resolve_data_path
from ..data.sft import record_to_pairs
from ..diffusion.sampler import generate
from ..diffusion.sampler_config import SamplerConfig
from .config import TrainingConfig


def preview_prompts(cfg: TrainingConfig, tokenizer) -> list[str]:
    """Chat-formatted prompts: the configured ones, else the first SFT test (or validation) records."""
    if cfg.preview.prompts:
        return [tokenizer.format_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in cfg.preview.prompts[: cfg.preview.num_prompts]]
    files = [str(Path(f).with_name("test.jsonl")) for f in cfg.sft.data.train_files[:1]] + list(cfg.sft.data.val_files)
    for f in files:
        if resolve_data_path(f).is_file():
            records = read_jsonl_records(resolve_data_path(f))[: cfg.preview.num_prompts]
            return [record_to_pairs(r, tokenizer, multi_turn_split=False)[0][0] for _, r in records]
    return []


def preview_sampler(cfg: TrainingConfig, longest_prompt: int) -> SamplerConfig:
    """The preview's sampler settings, their budget fitted to the window SFT trained on less the longest prompt."""
    window = cfg.sft.data.max_seq_len or cfg.model.max_seq_len  # the window SFT trained on (null: the model's)
    return fit_sampler(cfg.preview.sampler, window - longest_prompt)[0]


def preview_answers(cfg: TrainingConfig, model, tokenizer) -> list[dict[str, str]]:
    prompts = preview_prompts(cfg, tokenizer)
    if not prompts or cfg.preview.num_prompts == 0:
        return []
    device = next(model.parameters()).device
    model.eval()
    ids = [torch.tensor(tokenizer.encode(p), dtype=torch.long, device=device) for p in prompts]
    options = asdict(preview_sampler(cfg, max(len(i) for i in ids)))
    outputs = generate(model, ids, **options, generator=torch.Generator(device).manual_seed(cfg.seed))
    return [{"prompt": p, "answer": tokenizer.decode(out)} for p, out in zip(prompts, outputs)]
