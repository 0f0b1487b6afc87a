"""`build_model`: the one way to instantiate a mask predictor from a preset name, config or dict."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from .config import ModelConfig, get_preset
from .transformer import MaskPredictor


def build_model(
    preset_or_config: str | ModelConfig | dict = "tiny",
    *,
    device: str | torch.device | None = None,
    **overrides,
) -> MaskPredictor:
    """Build the model. `device="meta"` builds the structure without allocating weights."""
    if isinstance(preset_or_config, str):
        cfg = get_preset(preset_or_config, **overrides)
    else:
        if isinstance(preset_or_config, dict):
            preset_or_config = ModelConfig(**preset_or_config)
        known = {f.name for f in fields(ModelConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown model config key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
        cfg = replace(preset_or_config, **overrides).validate()
    with torch.device(device) if device is not None else _nullcontext():
        return MaskPredictor(cfg)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
