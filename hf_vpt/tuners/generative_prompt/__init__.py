from ..._registry import register_method
from .config import GenerativePromptConfig
from .generator import PromptGenerator
from .layer import GenerativePromptBank, GenerativePromptBlock
from .model import GenerativePromptModel


__all__ = [
    "GenerativePromptBank",
    "GenerativePromptBlock",
    "GenerativePromptConfig",
    "GenerativePromptModel",
    "PromptGenerator",
]

register_method("generative_prompt", GenerativePromptConfig, GenerativePromptModel)
