from ...registry import MethodSpec, TrainingVariant, register
from ..visual_prompt import prompt_flops
from .config import GatedPromptConfig
from .layer import GatedPromptBank, GatedPromptBlock
from .model import GatedPromptModel, gate_values


__all__ = ["GatedPromptBank", "GatedPromptBlock", "GatedPromptConfig", "GatedPromptModel", "gate_values"]


def _summary(config: GatedPromptConfig) -> str:
    where = "before every block" if config.depth == "deep" else "before the first block"
    temperature = " and an attention temperature per block" if config.learn_temperature else ""
    return f"{config.num_prompt_tokens} learnable prompt tokens {where}, a gate per block{temperature}"


def _build_config(model, *, num_prompt_tokens: int, head_modules, **overrides) -> GatedPromptConfig:
    return GatedPromptConfig(
        num_prompt_tokens=num_prompt_tokens, modules_to_save=list(head_modules) or None, **overrides
    )


register(
    MethodSpec(
        name="gated_prompt",
        peft_type="GATED_PROMPT",
        config_cls=GatedPromptConfig,
        model_cls=GatedPromptModel,
        title="Gated Prompt Tuning",
        paper_title="Improving Visual Prompt Tuning for Self-supervised Vision Transformers (Yoo et al., ICML 2023)",
        paper_url="https://arxiv.org/abs/2306.05067",
        summary=_summary,
        card_usage="print(hf_vpt.gate_values(model))  # how open each block's gate is after training",
        # Gates and temperatures are element-wise: the matrix products are those of the prompts in the sequence.
        flops=prompt_flops,
        variants=(
            TrainingVariant(
                name="gated",
                title="gated prompt tuning",
                trains="adapter",
                optimizer="sgd",
                learning_rate=1.0,
                weight_decay=1e-4,
                defaults_source="recipes/image_classification.py flag defaults (digits experiment), not yet "
                "measured on a real backbone",
                build_config=_build_config,
            ),
        ),
    )
)
