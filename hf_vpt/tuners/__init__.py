from .approx_prompt import ApproxPromptConfig, ApproxPromptModel
from .gated_prompt import GatedPromptConfig, GatedPromptModel, gate_values
from .generative_prompt import GenerativePromptConfig, GenerativePromptModel
from .visual_prompt import VisualPromptConfig, VisualPromptModel


__all__ = [
    "ApproxPromptConfig",
    "ApproxPromptModel",
    "GatedPromptConfig",
    "GatedPromptModel",
    "GenerativePromptConfig",
    "GenerativePromptModel",
    "VisualPromptConfig",
    "VisualPromptModel",
    "gate_values",
]
