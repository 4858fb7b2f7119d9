from .visual_prompt import VisualPromptConfig, VisualPromptModel


__all__ = ["VisualPromptConfig", "VisualPromptModel"]
