from ...registry import MethodSpec, TrainingVariant, register
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


def _build_config(model, *, num_prompt_tokens: int, head_modules, **overrides) -> GenerativePromptConfig:
    # Generative models have no classification head; `num_classes` comes as an override (None: unconditional).
    return GenerativePromptConfig(
        num_prompt_tokens=num_prompt_tokens, modules_to_save=list(head_modules) or None, **overrides
    )


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
            TrainingVariant(
                name="generative",
                title="generative prompt tuning",
                trains="adapter",
                optimizer="adamw",
                learning_rate=1e-2,
                weight_decay=0.0,
                defaults_source="recipes/generative_transfer.py defaults (--learning_rate 1e-2, --weight_decay 0), "
                "not yet measured on a real backbone",
                build_config=_build_config,
            ),
        ),
    )
)
