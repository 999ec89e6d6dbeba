"""The DeepSeek-V3 architecture in pure PyTorch, one file per concept."""

from seekforge.model.config import PRESETS, ModelConfig
from seekforge.model.transformer import ModelLoss, Transformer

__all__ = ["PRESETS", "ModelConfig", "ModelLoss", "Transformer"]
