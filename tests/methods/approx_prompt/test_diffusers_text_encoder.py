"""hf_vpt adapters on the CLIP text encoder of a tiny diffusers Stable Diffusion pipeline built from configs.

Two pipelines built with the same seeds are identical, so "untouched" below is a second copy that never sees an
adapter. Images are compared exactly: the adapter must either change nothing (disabled, detached, reloaded) or
change the prompt embeddings.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hf_vpt
from hf_vpt.testing_utils import (
    tiny_clip_text,
    tiny_clip_tokenizer,
    tiny_sd_unet,
    tiny_sd_vae,
    tiny_stable_diffusion,
    write_clip_tokenizer,
)


PROMPT = "a photo of a cat"
SIZE = 32  # pixels; the two-level VAE gives 16x16 latents
MERGES = ["c a", "ca t</w>", "p h", "o t", "ph ot", "phot o</w>"]

CONFIGS = {
    "apt": lambda: hf_vpt.ApproxPromptConfig(num_prompt_tokens=4, rank=2),
    "deep_vpt": lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep"),
}


# ---------------------------------------------------------------------------------------------------------------------
# a tiny pipeline
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """vocab.json/merges.txt of a tiny CLIP BPE: every byte (alone and word-final), a few merges, BOS and EOS."""
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"), MERGES)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def make_pipe(tokenizer_dir, seed: int = 0) -> StableDiffusionPipeline:
    return tiny_stable_diffusion(tokenizer_dir, _scheduler(), max_length=77, seed=seed)


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(
            PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", generator=generator, **kwargs
        )
    return out.images


def prompt_embeds(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings exactly as the pipeline computes them (classifier-free guidance on)."""
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)


def randomise(model: PeftModel, seed: int = 3) -> None:
    """Give the adapter's (trainable) parameters values far from their initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_generation_with_adapter_and_disabled(tokenizer_dir, method):
    untouched = make_pipe(tokenizer_dir)
    pipe = make_pipe(tokenizer_dir)
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    unet_state = snapshot(unet)

    model = hf_vpt.attach_text_encoder_adapter(pipe, CONFIGS[method]())
    randomise(model)
    assert pipe.text_encoder is model and isinstance(model, PeftModel)
    assert (pipe.unet, pipe.vae, pipe.scheduler) == (unet, vae, scheduler)
    # diffusers unwraps PeftModels when it registers a component: the pipeline config still names the CLIP model
    assert tuple(pipe.config.text_encoder) == ("transformers", "CLIPTextModel")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_bank." not in n)

    plain, plain_negative = prompt_embeds(untouched)
    ours, ours_negative = prompt_embeds(pipe)
    assert ours.shape == plain.shape == (1, 77, 32) and ours.dtype == plain.dtype
    assert (ours - plain).abs().max() > 1e-2 and (ours_negative - plain_negative).abs().max() > 1e-2

    expected = generate(untouched)
    image = generate(pipe)
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    assert not np.array_equal(image, expected)
    # a LoRA scale (meant for UNet LoRAs) reaches the text encoder's tuner layers; prompts ignore it
    assert np.array_equal(generate(pipe, cross_attention_kwargs={"scale": 0.5}), image)

    with pipe.text_encoder.disable_adapter():
        assert np.array_equal(generate(pipe), expected)
        disabled, _ = prompt_embeds(pipe)
    assert torch.equal(disabled, plain)
    assert_same_state(pipe.unet, unet_state)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_and_load_on_a_fresh_pipeline(tokenizer_dir, tmp_path, method):
    pipe = make_pipe(tokenizer_dir)
    config = CONFIGS[method]()
    randomise(hf_vpt.attach_text_encoder_adapter(pipe, config))
    hf_vpt.save_text_encoder_adapter(pipe, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "hf_vpt_card.json",
    ]

    fresh = make_pipe(tokenizer_dir)
    loaded = hf_vpt.load_text_encoder_adapter(fresh, str(tmp_path))
    assert fresh.text_encoder is loaded and type(loaded.peft_config["default"]) is type(config)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference load must freeze the adapter"
    for a, b in zip(prompt_embeds(pipe), prompt_embeds(fresh)):
        assert torch.equal(a, b)
    assert np.array_equal(generate(pipe, seed=5), generate(fresh, seed=5))

    trainable = hf_vpt.load_text_encoder_adapter(make_pipe(tokenizer_dir), str(tmp_path), is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "_bank." in n)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_detach_restores_the_original_encoder(tokenizer_dir, method):
    untouched = make_pipe(tokenizer_dir)
    pipe = make_pipe(tokenizer_dir)
    original = pipe.text_encoder
    original.final_layer_norm.train()  # an unusual mode and trainability, to see both restored
    original.embeddings.token_embedding.weight.requires_grad_(False)
    state = snapshot(original)
    modules = [(name, type(m), sorted(vars(m))) for name, m in original.named_modules()]
    flags = {name: p.requires_grad for name, p in original.named_parameters()}
    modes = {name: m.training for name, m in original.named_modules()}

    randomise(hf_vpt.attach_text_encoder_adapter(pipe, CONFIGS[method]()))
    prompt_embeds(pipe)
    restored = hf_vpt.detach_text_encoder_adapter(pipe)

    assert restored is original and pipe.text_encoder is original
    assert_same_state(original, state)
    assert [(name, type(m), sorted(vars(m))) for name, m in original.named_modules()] == modules
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in original.modules())
    assert {name: p.requires_grad for name, p in original.named_parameters()} == flags
    assert {name: m.training for name, m in original.named_modules()} == modes
    for a, b in zip(prompt_embeds(pipe), prompt_embeds(untouched)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="carries no adapter"):
        hf_vpt.detach_text_encoder_adapter(pipe)


def test_encoder_calls_the_pipelines_make(tokenizer_dir):
    """`encode_prompt` variants: `use_attention_mask`, `output_hidden_states` (what clip_skip reads), the dtype."""
    untouched = make_pipe(tokenizer_dir)
    pipe = make_pipe(tokenizer_dir)
    model = hf_vpt.attach_text_encoder_adapter(pipe, CONFIGS["deep_vpt"]())
    randomise(model)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        plain = untouched.text_encoder(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(plain.hidden_states) == 4
    assert all(h.shape == (1, 77, 32) for h in out.hidden_states)  # prompt positions removed everywhere
    assert (out.hidden_states[-2] - plain.hidden_states[-2]).abs().max() > 1e-2

    for p in (pipe, untouched):
        p.text_encoder.config.use_attention_mask = True  # the PeftModel reads the CLIP model's config
    ours, _ = prompt_embeds(pipe)
    with pipe.text_encoder.disable_adapter():
        disabled, _ = prompt_embeds(pipe)
    plain_embeds, _ = prompt_embeds(untouched)
    assert torch.equal(disabled, plain_embeds) and (ours - plain_embeds).abs().max() > 1e-2

    pipe.text_encoder.to(torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16
    ours, negative = prompt_embeds(pipe)
    assert ours.dtype == negative.dtype == torch.bfloat16 and torch.isfinite(ours).all()


def test_sdxl_second_text_encoder(tokenizer_dir):
    """SDXL reads `hidden_states[-2]` of both encoders and the pooled projection of `text_encoder_2`."""

    def make_xl():
        tokenizer = tiny_clip_tokenizer(tokenizer_dir, max_length=77)
        torch.manual_seed(0)
        unet = tiny_sd_unet(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
        )
        pipe = StableDiffusionXLPipeline(
            vae=tiny_sd_vae(),
            text_encoder=tiny_clip_text(tokenizer),
            text_encoder_2=tiny_clip_text(tokenizer, projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
        )
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    untouched, pipe = make_xl(), make_xl()
    model = hf_vpt.attach_text_encoder_adapter(pipe, CONFIGS["deep_vpt"](), component="text_encoder_2")
    randomise(model)
    assert not isinstance(pipe.text_encoder, PeftModel)  # the first encoder is left alone
    with torch.no_grad():
        ours = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
        plain = untouched.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
        with pipe.text_encoder_2.disable_adapter():
            disabled = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False)
    embeds, pooled = ours[0], ours[2]
    assert embeds.shape == plain[0].shape == (1, 77, 64) and pooled.shape == plain[2].shape == (1, 32)
    assert torch.equal(embeds[..., :32], plain[0][..., :32])  # the first encoder is untouched
    assert (embeds[..., 32:] - plain[0][..., 32:]).abs().max() > 1e-2 and (pooled - plain[2]).abs().max() > 1e-2
    assert torch.equal(disabled[0], plain[0]) and torch.equal(disabled[2], plain[2])
    assert generate(pipe).shape == (1, SIZE, SIZE, 3)


def test_clear_errors(tokenizer_dir, tmp_path):
    pipe = make_pipe(tokenizer_dir)
    config = CONFIGS["apt"]()
    with pytest.raises(TypeError, match="hf_vpt config"):
        hf_vpt.attach_text_encoder_adapter(pipe, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="has no `text_encoder_2`"):
        hf_vpt.attach_text_encoder_adapter(pipe, config, component="text_encoder_2")
    with pytest.raises(ValueError, match="must be one of"):
        hf_vpt.attach_text_encoder_adapter(pipe, config, component="unet")
    with pytest.raises(ValueError, match="carries no adapter"):
        hf_vpt.save_text_encoder_adapter(pipe, tmp_path / "nothing")

    # a LoRA adapter folder is refused before the encoder is touched
    lora = get_peft_model(tiny_clip_text(pipe.tokenizer), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    encoder = pipe.text_encoder
    with pytest.raises(TypeError, match="not an hf_vpt one"):
        hf_vpt.load_text_encoder_adapter(pipe, str(tmp_path / "lora"))
    assert pipe.text_encoder is encoder

    hf_vpt.attach_text_encoder_adapter(pipe, config)
    with pytest.raises(ValueError, match="already carries adapter"):
        hf_vpt.attach_text_encoder_adapter(pipe, config)

    pipe.text_encoder = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="not a CLIP text encoder"):
        hf_vpt.attach_text_encoder_adapter(pipe, config)
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="is None"):
        hf_vpt.attach_text_encoder_adapter(pipe, config)


# ---------------------------------------------------------------------------------------------------------------------
# adapters from strangers, through the diffusers helpers
# ---------------------------------------------------------------------------------------------------------------------
def _tampered_folder(tokenizer_dir, folder, edit_weights=None, edit_config=None):
    pipe = make_pipe(tokenizer_dir)
    randomise(hf_vpt.attach_text_encoder_adapter(pipe, CONFIGS["deep_vpt"]()))
    hf_vpt.save_text_encoder_adapter(pipe, folder)
    if edit_weights is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        edit_weights(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    if edit_config is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        edit_config(data)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


def _pickle_only(folder, marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": Payload()}))


BAD_FOLDERS = {
    "base_key": (
        {"edit_weights": lambda t: t.__setitem__("base_model.model.final_layer_norm.weight", torch.zeros(32))},
        hf_vpt.AdapterLoadError,
        ["base_model.model.final_layer_norm.weight", "outside the adapter"],
    ),
    "nan": (
        {"edit_weights": lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in t.items()})},
        hf_vpt.AdapterLoadError,
        ["NaN or infinite"],
    ),
    "config_bool_tokens": (
        {"edit_config": lambda c: c.__setitem__("num_prompt_tokens", True)},
        ValueError,
        ["`num_prompt_tokens`", "True"],
    ),
    "config_tower_shapes": (
        {"edit_config": lambda c: c.__setitem__("tower_shapes", {"text": [3]})},
        ValueError,
        ["`tower_shapes`"],
    ),
    "pickle_only": ({}, hf_vpt.AdapterLoadError, ["pickle", "safetensors"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_load_text_encoder_adapter_refuses_bad_folders_and_leaves_the_pipeline_alone(tokenizer_dir, tmp_path, case):
    edits, error, words = BAD_FOLDERS[case]
    folder = _tampered_folder(tokenizer_dir, tmp_path / "a", **edits)
    marker = tmp_path / "pwned"
    if case == "pickle_only":
        _pickle_only(folder, marker)
    pipe = make_pipe(tokenizer_dir)
    encoder = pipe.text_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    embeds = prompt_embeds(pipe)
    with pytest.raises(error) as raised:
        hf_vpt.load_text_encoder_adapter(pipe, str(folder))
    for word in words:
        assert word in str(raised.value), str(raised.value)
    assert pipe.text_encoder is encoder and not hasattr(encoder, "peft_config")
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    for a, b in zip(embeds, prompt_embeds(pipe)):
        assert torch.equal(a, b)
    assert not marker.exists()
