"""Tiny models built from configs (no network) for every architecture hf_vpt supports."""

from __future__ import annotations

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


IMAGE = 32
PATCH = 8
COMMON = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}


def _vit(**extra):
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_labels=5, **COMMON, **extra)
    return transformers.ViTForImageClassification(config)


def _deit():
    config = transformers.DeiTConfig(image_size=IMAGE, patch_size=PATCH, num_labels=5, **COMMON)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def _vit_mae():
    config = transformers.ViTMAEConfig(image_size=IMAGE, patch_size=PATCH, mask_ratio=0.0, **COMMON)
    return transformers.ViTMAEModel(config)


def _dinov2():
    config = transformers.Dinov2Config(image_size=IMAGE, patch_size=PATCH, num_labels=5, **COMMON)
    return transformers.Dinov2ForImageClassification(config)


def _dinov2_registers():
    config = transformers.Dinov2WithRegistersConfig(
        image_size=IMAGE, patch_size=PATCH, num_register_tokens=2, num_labels=5, **COMMON
    )
    return transformers.Dinov2WithRegistersModel(config)


def _clip_vision():
    config = transformers.CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, projection_dim=16, **COMMON)
    return transformers.CLIPVisionModel(config)


def _clip():
    vision = dict(image_size=IMAGE, patch_size=PATCH, **COMMON)
    text = dict(vocab_size=99, max_position_embeddings=16, **COMMON)
    config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    return transformers.CLIPModel(config)


def _siglip_vision():
    config = transformers.SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, **COMMON)
    return transformers.SiglipVisionModel(config)


# name -> (factory, number of special tokens before the prompts)
ARCHITECTURES = {
    "vit": (_vit, 1),
    "deit": (_deit, 2),
    "vit_mae": (_vit_mae, 1),
    "dinov2": (_dinov2, 1),
    "dinov2_registers": (_dinov2_registers, 3),
    "clip_vision": (_clip_vision, 1),
    "clip": (_clip, 1),
    "siglip_vision": (_siglip_vision, 0),
}


def build(name: str, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[name][0]()
    model.set_attn_implementation(attn)
    return model.eval()


def pixels(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def model_inputs(name: str, batch: int = 3) -> dict:
    inputs = {"pixel_values": pixels(batch)}
    if name == "clip":
        inputs["input_ids"] = torch.randint(0, 99, (batch, 7), generator=torch.Generator().manual_seed(2))
    if name == "vit_mae":
        inputs["noise"] = torch.arange((IMAGE // PATCH) ** 2, dtype=torch.float32).repeat(batch, 1)
    return inputs


def main_output(name: str, output) -> torch.Tensor:
    """The tensor a user of each model reads."""
    if name == "clip":
        return output.logits_per_image
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    if getattr(output, "pooler_output", None) is not None:
        return torch.cat([output.pooler_output.flatten(1), output.last_hidden_state.flatten(1)], dim=1)
    return output.last_hidden_state


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param
