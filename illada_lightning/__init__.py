"""illada-lightning: the iLLaDA masked-diffusion language-model recipe on PyTorch Lightning.

Public API (see README.md):
    build_model(preset_or_config, **overrides)      -> MaskPredictor
    load_checkpoint(path)                           -> (model, tokenizer)
    generate(model, prompt_ids, **options)          -> generated token ids
    score_choices(model, context_ids, candidates, rule=..., **options) -> one score per candidate
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# Every entry point loads on first use: `import illada_lightning.config` (what the CLIs need to parse and
# validate a command line) then never waits for torch to import.
_LAZY = {
    "MaskPredictor": "illada_lightning.model.transformer",
    "count_parameters": "illada_lightning.model.transformer",
    "ModelConfig": "illada_lightning.model.config",
    "build_model": "illada_lightning.model.build",
    "load_checkpoint": "illada_lightning.checkpoint",
    "generate": "illada_lightning.diffusion.sampler",
    "score_choices": "illada_lightning.diffusion.scoring",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'illada_lightning' has no attribute {name!r}")


__all__ = list(_LAZY)
