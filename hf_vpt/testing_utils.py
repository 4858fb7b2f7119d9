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
# Smaller still, for tests that loop over many cycles or steps: `tiny_vit(**MICRO_VIT)` (16 px images, 2 blocks of
# width 16, 2 heads) and `tiny_imagegpt(**MICRO_IMAGEGPT)` (8 positions, width 16, 2 heads).
MICRO_VIT = {
    "image_size": 16,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
MICRO_IMAGEGPT = {"n_positions": 8, "n_embd": 16, "n_head": 2}


def tiny_vit(num_labels: int = 5, **config) -> transformers.ViTForImageClassification:
    """A tiny `ViTForImageClassification`; `config` overrides any `ViTConfig` field (image_size, hidden_size, ...)."""
    settings = {"image_size": IMAGE, "patch_size": PATCH, "num_labels": num_labels, **COMMON, **config}
    return transformers.ViTForImageClassification(transformers.ViTConfig(**settings))


def tiny_deit(**config) -> transformers.DeiTForImageClassificationWithTeacher:
    settings = {"image_size": IMAGE, "patch_size": PATCH, "num_labels": 5, **COMMON, **config}
    config = transformers.DeiTConfig(**settings)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def tiny_vit_mae(**config) -> transformers.ViTMAEModel:
    settings = {"image_size": IMAGE, "patch_size": PATCH, "mask_ratio": 0.0, **COMMON, **config}
    config = transformers.ViTMAEConfig(**settings)
    return transformers.ViTMAEModel(config)


def tiny_dinov2(**config) -> transformers.Dinov2ForImageClassification:
    settings = {"image_size": IMAGE, "patch_size": PATCH, "num_labels": 5, **COMMON, **config}
    config = transformers.Dinov2Config(**settings)
    return transformers.Dinov2ForImageClassification(config)


def tiny_dinov2_registers(**config) -> transformers.Dinov2WithRegistersModel:
    settings = {
        "image_size": IMAGE,
        "patch_size": PATCH,
        "num_register_tokens": 2,
        "num_labels": 5,
        **COMMON,
        **config,
    }
    config = transformers.Dinov2WithRegistersConfig(**settings)
    return transformers.Dinov2WithRegistersModel(config)


def tiny_clip_vision(**config) -> transformers.CLIPVisionModel:
    settings = {"image_size": IMAGE, "patch_size": PATCH, "projection_dim": 16, **COMMON, **config}
    config = transformers.CLIPVisionConfig(**settings)
    return transformers.CLIPVisionModel(config)


def tiny_clip(**config) -> transformers.CLIPModel:
    """A tiny `CLIPModel`; `config` overrides `CLIPConfig` fields (`vision_config` / `text_config` dicts replace
    the tiny towers' settings)."""
    vision = dict(image_size=IMAGE, patch_size=PATCH, **COMMON)
    text = dict(vocab_size=TEXT_VOCAB, max_position_embeddings=16, **COMMON)
    settings = {"vision_config": vision, "text_config": text, "projection_dim": 16, **config}
    config = transformers.CLIPConfig(**settings)
    return transformers.CLIPModel(config)


def tiny_siglip_vision(**config) -> transformers.SiglipVisionModel:
    config = transformers.SiglipVisionConfig(**{"image_size": IMAGE, "patch_size": PATCH, **COMMON, **config})
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


def tiny_clip_text(tokenizer=None, projection: bool = False, **config):
    """A tiny CLIP text tower (`CLIPTextModel`, or `CLIPTextModelWithProjection` with `projection`): 3 blocks of width
    32, vocabulary 99, 16 positions, projection width = hidden width. With a `tokenizer` (e.g. `tiny_clip_tokenizer`)
    its vocabulary size, BOS / EOS / pad ids and `model_max_length` positions; `config` overrides any
    `CLIPTextConfig` field."""
    settings = {"vocab_size": TEXT_VOCAB, "max_position_embeddings": 16, **COMMON}
    if tokenizer is not None:
        settings.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=tokenizer.model_max_length,
        )
    settings.update(config)
    settings.setdefault("projection_dim", settings["hidden_size"])
    head = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return head(transformers.CLIPTextConfig(**settings))


def tiny_siglip_text(**config) -> transformers.SiglipTextModel:
    """A tiny SigLIP text tower: 3 blocks of width 32, vocabulary 99, 16 positions; `config` overrides any
    `SiglipTextConfig` field."""
    settings = {"vocab_size": TEXT_VOCAB, "max_position_embeddings": 16, **COMMON, **config}
    return transformers.SiglipTextModel(transformers.SiglipTextConfig(**settings))


def _clip_byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1)]
    printable += range(ord("\u00ae"), ord("\u00ff") + 1)
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_clip_tokenizer(folder, merges: tuple[str, ...] | list[str] = ()) -> str:
    """Write `vocab.json` / `merges.txt` of a tiny CLIP BPE into `folder`: every byte (alone and word-final), the
    tokens `merges` make (pairs such as "c a"), BOS and EOS. Returns the folder, for `tiny_clip_tokenizer`."""
    import json
    import os

    symbols = _clip_byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump({token: i for i, token in enumerate(tokens)}, handle)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(merge + "\n" for merge in merges))
    return str(folder)


def tiny_clip_tokenizer(folder, max_length: int = 77) -> transformers.CLIPTokenizer:
    """The CLIP tokenizer `write_clip_tokenizer` wrote into `folder`, padding / truncating to `max_length`."""
    return transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def tiny_sd_vae():
    """A tiny diffusers `AutoencoderKL` with two levels (images of `2 * n` px to latents of `n` px, 4 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )  # fmt: skip


def tiny_sd_unet(sample_size: int = IMAGE // 2, **config):
    """A tiny diffusers `UNet2DConditionModel` for `tiny_sd_vae` latents (`sample_size` px, 4 channels), cross
    attention to width-32 text states; `config` overrides any of its arguments (e.g. SDXL's `addition_embed_type`)."""
    from diffusers import UNet2DConditionModel

    settings = {
        "block_out_channels": (4, 8),
        "layers_per_block": 1,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 2,
        **config,
    }
    return UNet2DConditionModel(sample_size=sample_size, **settings)


def tiny_stable_diffusion(tokenizer_folder, scheduler, max_length: int = 77, seed: int | None = None):
    """A tiny diffusers `StableDiffusionPipeline` from configs, for `IMAGE` px images: the tokenizer
    `write_clip_tokenizer` wrote into `tokenizer_folder` (`max_length` tokens), `tiny_sd_unet`, `tiny_sd_vae` and
    `tiny_clip_text` built in that order (after `torch.manual_seed(seed)` unless `seed` is None), `scheduler`, no
    safety checker; the models in eval mode (as `from_pretrained` leaves them), no progress bar."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(tokenizer_folder, max_length)
    if seed is not None:
        torch.manual_seed(seed)
    unet = tiny_sd_unet()
    vae = tiny_sd_vae()
    text_encoder = tiny_clip_text(tokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_imagegpt(
    codebook_size: int = 16,
    grid: int = 4,
    head: str = "ImageGPTForCausalImageModeling",
    n_positions: int | None = None,
    **config,
):
    """A tiny ImageGPT over a `grid` x `grid` image of `codebook_size` colour ids (the last id is the start token);
    `n_positions` defaults to the start token plus the grid; `config` overrides any `ImageGPTConfig` field (n_embd,
    n_head, the dropouts, ...)."""
    settings = {
        "vocab_size": codebook_size + 1,
        "n_positions": n_positions or grid * grid + 1,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        **config,
    }
    return getattr(transformers, head)(transformers.ImageGPTConfig(**settings))


def imagegpt_ids(batch: int, length: int, codebook_size: int = 16, seed: int = 3) -> torch.Tensor:
    """Random ImageGPT input ids of `length`: the start token (`codebook_size`) then random colour ids."""
    body = torch.randint(0, codebook_size, (batch, length - 1), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((batch, 1), codebook_size), body], dim=1)


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


def uvit2d_conditioning(batch: int, seed: int = 1) -> dict:
    """Random conditioning of `tiny_uvit2d`: text states, pooled text embedding and micro-conditions."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=generator),
        "pooled_text_emb": torch.randn(batch, 16, generator=generator),
        "micro_conds": torch.randn(batch, 5, generator=generator),
    }


def token_grid(batch: int, grid: int = 4, codebook_size: int = 32, seed: int = 2) -> torch.Tensor:
    """Random `grid` x `grid` token maps (ids below `codebook_size`) for `tiny_uvit2d`."""
    return torch.randint(0, codebook_size, (batch, grid, grid), generator=torch.Generator().manual_seed(seed))


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


def build(name: str, seed: int = 0, attn: str = "eager", **config) -> torch.nn.Module:
    """The tiny `name` model (a key of `ARCHITECTURES`), initialised from `seed`, in eval mode; `config` overrides
    fields of its config (e.g. `build("vit", hidden_size=48)`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"No tiny model named {name!r}; choose from {', '.join(sorted(ARCHITECTURES))}.")
    torch.manual_seed(seed)
    model = ARCHITECTURES[name][0](**config)
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
