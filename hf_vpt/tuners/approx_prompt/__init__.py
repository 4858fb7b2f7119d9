from ..._registry import register_method
from .config import ApproxPromptConfig
from .layer import ApproxPromptBank, ApproxPromptLayer, approx_prompt_output
from .model import ApproxPromptModel


__all__ = ["ApproxPromptBank", "ApproxPromptConfig", "ApproxPromptLayer", "ApproxPromptModel", "approx_prompt_output"]

register_method("approx_prompt", ApproxPromptConfig, ApproxPromptModel)
