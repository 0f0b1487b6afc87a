"""illada-lightning: the iLLaDA masked-diffusion language-model recipe on PyTorch Lightning.

Public API (see README.md):
    build_model(preset_or_config, **overrides)      -> MaskPredictor
    load_checkpoint(path)                           -> (model, tokenizer)
    generate(model, prompt_ids, **options)          -> generated token ids
    score_choices(model, context_ids, candidates, rule=..., **options) -> one score per candidate
"""

from __future__ import annotations

from importlib import import_module

from .model import MaskPredictor, ModelConfig, count_parameters
from .model.build import build_model

__version__ = "0.1.0"

# Heavier entry points load on first use, so `import illada_lightning` stays fast.
_LAZY = {
    "load_checkpoint": "illada_lightning.checkpoint",
    "generate": "illada_lightning.diffusion.sampler",
    "score_choices": "illada_lightning.diffusion.scoring",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'illada_lightning' has no attribute {name!r}")


__all__ = ["MaskPredictor", "ModelConfig", "build_model", "count_parameters", *_LAZY]
