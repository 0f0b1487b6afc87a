"""The mask predictor and its configuration."""

from importlib import import_module

from .config import PRESETS, ModelConfig, get_preset

_TORCH = {"MaskPredictor", "count_parameters"}  # loaded on first use: the config needs no torch


def __getattr__(name: str):
    if name in _TORCH:
        return getattr(import_module("illada_lightning.model.transformer"), name)
    raise AttributeError(f"module 'illada_lightning.model' has no attribute {name!r}")


__all__ = ["PRESETS", "MaskPredictor", "ModelConfig", "count_parameters", "get_preset"]
