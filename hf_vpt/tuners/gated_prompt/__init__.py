from ..._registry import register_method
from .config import GatedPromptConfig
from .layer import GatedPromptBank, GatedPromptBlock
from .model import GatedPromptModel, gate_values


__all__ = ["GatedPromptBank", "GatedPromptBlock", "GatedPromptConfig", "GatedPromptModel", "gate_values"]

register_method("gated_prompt", GatedPromptConfig, GatedPromptModel)
