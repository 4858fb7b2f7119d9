from ... import flops as _flops
from ...registry import MEASURED_ON_REAL_VIT, MethodSpec, adapter_variant, register
from .config import ApproxPromptConfig
from .layer import ApproxPromptBank, ApproxPromptLayer, approx_prompt_output
from .model import ApproxPromptModel


__all__ = ["ApproxPromptBank", "ApproxPromptConfig", "ApproxPromptLayer", "ApproxPromptModel", "approx_prompt_output"]


def _summary(config: ApproxPromptConfig) -> str:
    return (
        f"an approximated-prompt term ({config.num_prompt_tokens} prompts and a rank-{config.rank} key map per "
        "layer) to each adapted attention output; no token enters the sequence"
    )


def _extra_flops(tower, config: ApproxPromptConfig, *, seq_len: int, batch_size: int, mode: str) -> int:
    """The method's `flops` (hf_vpt.flops.extra_forward_flops) on one tower; `mode` is for prompts in the sequence."""
    return _flops.approx_prompt_flops(
        num_layers=len(config.adapted_layers(tower.num_layers)) * len(config.attentions),
        hidden_size=tower.hidden_size,
        seq_len=seq_len,
        num_prompt_tokens=config.num_prompt_tokens,
        rank=config.rank,
        batch_size=batch_size,
    )


register(
    MethodSpec(
        name="approx_prompt",
        peft_type="APPROX_PROMPT",
        config_cls=ApproxPromptConfig,
        model_cls=ApproxPromptModel,
        title="Approximated Prompt Tuning",
        paper_title="Approximated Prompt Tuning for Vision-Language Pre-trained Models (Wu et al., ICCV 2023)",
        paper_url="https://arxiv.org/abs/2306.15706",
        summary=_summary,
        card_usage=None,
        flops=_extra_flops,
        variants=(
            adapter_variant(
                "apt",
                "APT",
                ApproxPromptConfig,
                optimizer="adamw",
                learning_rate=3e-3,
                weight_decay=0.01,
                defaults_source=MEASURED_ON_REAL_VIT,
                # the paper's towers: ViT, ViLT, the Stable Diffusion text encoder
                tasks=("image-classification", "vision-language", "text-to-image"),
            ),
        ),
    )
)
