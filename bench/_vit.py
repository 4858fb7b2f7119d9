"""The ViT-B/16 geometry the speed benchmarks share (random weights: timing does not depend on the values)."""

from __future__ import annotations

import torch
from transformers import ViTConfig, ViTForImageClassification


def build_vit_b16(layers: int = 12, num_labels: int = 100) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)
