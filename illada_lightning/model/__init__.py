"""The mask predictor and its configuration."""

from .config import PRESETS, ModelConfig, get_preset
from .transformer import MaskPredictor, count_parameters

__all__ = ["PRESETS", "MaskPredictor", "ModelConfig", "count_parameters", "get_preset"]
