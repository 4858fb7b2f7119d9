from ... import flops as _flops
from ...registry import MethodSpec, TrainingVariant, register
from .config import VisualPromptConfig
from .layer import VisualPromptBank, VisualPromptBlock
from .model import VisualPromptModel


__all__ = ["VisualPromptBank", "VisualPromptBlock", "VisualPromptConfig", "VisualPromptModel"]

# recipes/image_classification.py's --lr_vpt_<depth> / --weight_decay defaults, chosen on its digits experiment.
_DEFAULTS = "recipes/image_classification.py flag defaults (digits experiment), not yet measured on a real backbone"


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


def _variant(depth: str) -> TrainingVariant:
    def build_config(model, *, num_prompt_tokens: int, head_modules, **overrides) -> VisualPromptConfig:
        return VisualPromptConfig(
            num_prompt_tokens=num_prompt_tokens, depth=depth, modules_to_save=list(head_modules) or None, **overrides
        )

    return TrainingVariant(
        name=f"vpt_{depth}",
        title=f"VPT-{depth}",
        trains="adapter",
        optimizer="sgd",
        learning_rate=0.25,
        weight_decay=1e-4,
        defaults_source=_DEFAULTS,
        build_config=build_config,
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
        variants=(_variant("shallow"), _variant("deep")),
    )
)
