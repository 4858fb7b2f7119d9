"""Tiny random models built from configs, for tests, examples and the recipes' `--tiny` modes (no network).

As `transformers.testing_utils` does for transformers: one importable place for the small models every hf_vpt
architecture is checked on, so tests, benches and examples build the same ones.

    from hf_vpt.testing_utils import build, model_inputs

    model = build("vit")  # a 3-block ViT, 32 px images, patch 8, width 32, in eval mode
    logits = model(**model_inputs("vit")).logits
"""

from __future__ import annotations

import torch
import transformers


IMAGE = 32
PATCH = 8
# The geometry every tiny tower shares: 3 blocks, width 32, 4 heads.
COMMON = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
TEXT_VOCAB = 99


def tiny_vit(num_labels: int = 5, **config) -> transformers.ViTForImageClassification:
    """A tiny `ViTForImageClassification`; `config` overrides any `ViTConfig` field (image_size, hidden_size, ...)."""
    settings = {"image_size": IMAGE, "patch_size": PATCH, "num_labels": num_labels, **COMMON, **config}
    return transformers.ViTForImageClassification(transformers.ViTConfig(**settings))


def tiny_deit() -> transformers.DeiTForImageClassificationWithTeacher:
    config = transformers.DeiTConfig(image_size=IMAGE, patch_size=PATCH, num_labels=5, **COMMON)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def tiny_vit_mae() -> transformers.ViTMAEModel:
    config = transformers.ViTMAEConfig(image_size=IMAGE, patch_size=PATCH, mask_ratio=0.0, **COMMON)
    return transformers.ViTMAEModel(config)


def tiny_dinov2() -> transformers.Dinov2ForImageClassification:
    config = transformers.Dinov2Config(image_size=IMAGE, patch_size=PATCH, num_labels=5, **COMMON)
    return transformers.Dinov2ForImageClassification(config)


def tiny_dinov2_registers() -> transformers.Dinov2WithRegistersModel:
    config = transformers.Dinov2WithRegistersConfig(
        image_size=IMAGE, patch_size=PATCH, num_register_tokens=2, num_labels=5, **COMMON
    )
    return transformers.Dinov2WithRegistersModel(config)


def tiny_clip_vision() -> transformers.CLIPVisionModel:
    config = transformers.CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, projection_dim=16, **COMMON)
    return transformers.CLIPVisionModel(config)


def tiny_clip() -> transformers.CLIPModel:
    vision = dict(image_size=IMAGE, patch_size=PATCH, **COMMON)
    text = dict(vocab_size=TEXT_VOCAB, max_position_embeddings=16, **COMMON)
    config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    return transformers.CLIPModel(config)


def tiny_siglip_vision() -> transformers.SiglipVisionModel:
    config = transformers.SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, **COMMON)
    return transformers.SiglipVisionModel(config)


def tiny_vilt(head: str = "ViltModel", **config):
    """A tiny ViLT (`head`: a transformers class name, e.g. "ViltForQuestionAnswering"), 32 px images, patch 8,
    vocabulary 99, 16 text positions; `config` overrides any `ViltConfig` field."""
    settings = {
        "image_size": IMAGE,
        "patch_size": PATCH,
        "vocab_size": TEXT_VOCAB,
        "max_position_embeddings": 16,
        **COMMON,
        **config,
    }
    return getattr(transformers, head)(transformers.ViltConfig(**settings))


def tiny_imagegpt(codebook_size: int = 16, grid: int = 4, head: str = "ImageGPTForCausalImageModeling"):
    """A tiny ImageGPT over a `grid` x `grid` image of `codebook_size` colour ids (the last id is the start token)."""
    config = transformers.ImageGPTConfig(
        vocab_size=codebook_size + 1, n_positions=grid * grid + 1, n_embd=32, n_layer=2, n_head=4
    )
    return getattr(transformers, head)(config)


def tiny_uvit2d(codebook_size: int = 32, grid: int = 4):
    """A tiny diffusers `UVit2DModel` (aMUSEd's MaskGIT transformer) over a `grid` x `grid` token map; the last
    vocabulary id is the mask token. Its conditioning: text states of width 16, a pooled embedding of 16."""
    from diffusers import UVit2DModel

    return UVit2DModel(
        hidden_size=32, use_bias=False, hidden_dropout=0.0, cond_embed_dim=16, micro_cond_encode_dim=2,
        micro_cond_embed_dim=10, encoder_hidden_size=16, vocab_size=codebook_size + 1, codebook_size=codebook_size,
        in_channels=8, block_out_channels=16, num_res_blocks=1, downsample=False, upsample=False, block_num_heads=2,
        num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.0, intermediate_size=64, layer_norm_eps=1e-6,
        ln_elementwise_affine=True, sample_size=grid,
    )  # fmt: skip


def tiny_vqmodel(codebook_size: int = 32, grid: int = 4):
    """A tiny diffusers `VQModel` that decodes a `grid` x `grid` token map to `2 * grid` px RGB images."""
    from diffusers import VQModel

    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=8, num_vq_embeddings=codebook_size, vq_embed_dim=8, norm_num_groups=4,
        sample_size=2 * grid, lookup_from_codebook=True,
    )  # fmt: skip


# name -> (factory, number of special tokens before the prompts)
ARCHITECTURES = {
    "vit": (tiny_vit, 1),
    "deit": (tiny_deit, 2),
    "vit_mae": (tiny_vit_mae, 1),
    "dinov2": (tiny_dinov2, 1),
    "dinov2_registers": (tiny_dinov2_registers, 3),
    "clip_vision": (tiny_clip_vision, 1),
    "clip": (tiny_clip, 1),
    "siglip_vision": (tiny_siglip_vision, 0),
}


def build(name: str, seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """The tiny `name` model (a key of `ARCHITECTURES`), initialised from `seed`, in eval mode."""
    if name not in ARCHITECTURES:
        raise ValueError(f"No tiny model named {name!r}; choose from {', '.join(sorted(ARCHITECTURES))}.")
    torch.manual_seed(seed)
    model = ARCHITECTURES[name][0]()
    model.set_attn_implementation(attn)
    return model.eval()


def pixels(batch: int = 3, seed: int = 1) -> torch.Tensor:
    """Seeded random `[batch, 3, 32, 32]` images for the tiny models."""
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def model_inputs(name: str, batch: int = 3) -> dict:
    """Keyword inputs for the tiny `name` model: pixels, plus text ids for CLIP and a fixed noise for ViTMAE."""
    inputs = {"pixel_values": pixels(batch)}
    if name == "clip":
        inputs["input_ids"] = torch.randint(0, TEXT_VOCAB, (batch, 7), generator=torch.Generator().manual_seed(2))
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
