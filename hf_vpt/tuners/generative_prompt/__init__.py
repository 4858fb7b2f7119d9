from ...registry import MethodSpec, adapter_variant, register
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


def _summary(config: GenerativePromptConfig) -> str:
    return f"{config.num_prompt_tokens} prompt tokens per sample, generated from its class label by a small generator"


register(
    MethodSpec(
        name="generative_prompt",
        peft_type="GENERATIVE_PROMPT",
        config_cls=GenerativePromptConfig,
        model_cls=GenerativePromptModel,
        title="Generative Visual Prompt Tuning",
        paper_title="Visual Prompt Tuning for Generative Transfer Learning (Sohn et al., CVPR 2023)",
        paper_url="https://arxiv.org/abs/2210.00990",
        summary=_summary,
        card_usage=None,
        flops=None,  # no closed-form count yet: the prompts go through causal and bidirectional towers
        variants=(
            # No pretrained generator can be had on the machines we measure on: these are the settings of the
            # ImageGPT digits study (examples/generative_digits), where they train; `num_classes` comes as an override.
            adapter_variant(
                "generative",
                "generative prompt tuning",
                GenerativePromptConfig,
                optimizer="adamw",
                learning_rate=1e-2,
                weight_decay=0.0,
                defaults_source="examples/generative_digits/run.py (ImageGPT digits study, tiny generator); "
                "not measured on a large pretrained generator",
                tasks=("class-conditional-generation",),
            ),
        ),
    )
)
