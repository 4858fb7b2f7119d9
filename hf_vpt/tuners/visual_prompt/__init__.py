from ... import flops as _flops
from ...registry import MEASURED_ON_REAL_VIT, MethodSpec, adapter_variant, register
from .config import VisualPromptConfig
from .layer import VisualPromptBank, VisualPromptBlock
from .model import VisualPromptModel


__all__ = ["VisualPromptBank", "VisualPromptBlock", "VisualPromptConfig", "VisualPromptModel"]


def _summary(config: VisualPromptConfig) -> str:
    where = "before every block" if config.depth == "deep" else "before the first block"
    return f"{config.num_prompt_tokens} learnable prompt tokens {where}"


def prompt_flops(tower, config: VisualPromptConfig, *, seq_len: int, batch_size: int, mode: str) -> int:
    """The method's `flops` (hf_vpt.flops.extra_forward_flops): the extra FLOPs of the prompts on one tower."""
    # With concatenation the prompts stay in the sequence through every block (deep or shallow); a key/value prefix
    # only exists in the blocks that get new prompts.
    layers = tower.num_layers if mode == "concat" else config.prompt_rows(tower.num_layers)
    return _flops.deep_prompt_flops(
        num_layers=layers,
        hidden_size=tower.hidden_size,
        intermediate_size=_flops.mlp_width(tower),
        seq_len=seq_len,
        num_prompt_tokens=config.num_prompt_tokens,
        batch_size=batch_size,
        mode=mode,
    )


register(
    MethodSpec(
        name="visual_prompt",
        peft_type="VISUAL_PROMPT",
        config_cls=VisualPromptConfig,
        model_cls=VisualPromptModel,
        title="Visual Prompt Tuning",
        paper_title="Visual Prompt Tuning (Jia et al., ECCV 2022)",
        paper_url="https://arxiv.org/abs/2203.12119",
        summary=_summary,
        card_usage=None,
        flops=prompt_flops,
        variants=(
            # AdamW: SGD + momentum diverged on the real ViT-Ti (deep prompts at 0.01 and 0.25). Shallow prompts: 1e-2
            # (83.0 %) over 3e-3 (80.7 %); deep: 3e-3 (92.3 %) over 1e-2 (91.0 %) and 1e-3 (85.3 %).
            adapter_variant(
                "vpt_shallow",
                "VPT-shallow",
                VisualPromptConfig,
                depth="shallow",
                optimizer="adamw",
                learning_rate=1e-2,
                weight_decay=0.01,
                defaults_source=MEASURED_ON_REAL_VIT,
            ),
            adapter_variant(
                "vpt_deep",
                "VPT-deep",
                VisualPromptConfig,
                depth="deep",
                optimizer="adamw",
                learning_rate=3e-3,
                weight_decay=0.01,
                defaults_source=MEASURED_ON_REAL_VIT,
                # the APT paper's prompt baseline on ViLT and on the Stable Diffusion text encoder
                tasks=("image-classification", "vision-language", "text-to-image"),
            ),
        ),
    )
)
