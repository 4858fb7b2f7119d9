from .gated_prompt import GatedPromptConfig, GatedPromptModel, gate_values
from .visual_prompt import VisualPromptConfig, VisualPromptModel


__all__ = [
    "GatedPromptConfig",
    "GatedPromptModel",
    "VisualPromptConfig",
    "VisualPromptModel",
    "gate_values",
]
