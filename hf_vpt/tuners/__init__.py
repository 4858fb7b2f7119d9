# isort: off
# Import order is registration order, which `hf_vpt.registry.training_variants()` keeps: VPT first, then the
# methods built on it.
from .visual_prompt import VisualPromptConfig, VisualPromptModel
from .gated_prompt import GatedPromptConfig, GatedPromptModel, gate_values
from .approx_prompt import ApproxPromptConfig, ApproxPromptModel
from .generative_prompt import GenerativePromptConfig, GenerativePromptModel

# isort: on

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
