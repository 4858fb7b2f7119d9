from ..._registry import register_method
from .config import VisualPromptConfig
from .layer import VisualPromptBank, VisualPromptBlock
from .model import VisualPromptModel


__all__ = ["VisualPromptBank", "VisualPromptBlock", "VisualPromptConfig", "VisualPromptModel"]

register_method("visual_prompt", VisualPromptConfig, VisualPromptModel)
