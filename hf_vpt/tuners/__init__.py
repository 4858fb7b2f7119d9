from .approx_prompt import ApproxPromptConfig, ApproxPromptModel
from .gated_prompt import GatedPromptConfig, GatedPromptModel, gate_values
from .visual_prompt import VisualPromptConfig, VisualPromptModel


__all__ = [
    "ApproxPromptConfig",
    "ApproxPromptModel",
    "GatedPromptConfig",
    "GatedPromptModel",
    "VisualPromptConfig",
    "VisualPromptModel",
    "gate_values",
]
