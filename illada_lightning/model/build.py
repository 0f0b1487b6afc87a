"""`build_model`: the one way to instantiate a mask predictor from a preset name, config or dict."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .config import ModelConfig, get_preset, with_overrides
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
        base = ModelConfig(**preset_or_config) if isinstance(preset_or_config, dict) else preset_or_config
        cfg = with_overrides(base, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        return MaskPredictor(cfg)
