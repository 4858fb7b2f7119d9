"""The ViT-B/16 geometry the speed benchmarks share (random weights: timing does not depend on the values)."""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification


def build_vit_b16(
    layers: int = 12, num_labels: int = 100, attn_implementation: str | None = None
) -> ViTForImageClassification:
    """ViT-B/16 at 224x224; `attn_implementation` None keeps the model's default (SDPA), what users load.

    Count FLOPs on "eager": `torch.utils.flop_counter` sees its attention matmuls but misses the fused CPU SDPA kernel.
    """
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=num_labels,
        attn_implementation=attn_implementation,
    )
    return ViTForImageClassification(config)


def num_tokens(model: ViTForImageClassification) -> int:
    """Tokens the ViT's blocks see without prompts: the patches plus the CLS token."""
    config = model.config
    return (config.image_size // config.patch_size) ** 2 + 1
