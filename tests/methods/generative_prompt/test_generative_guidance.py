"""Prompt guidance for autoregressive sampling: `l_u + g · (l_p - l_u)` between prompted and frozen ImageGPT logits.

Guidance is an hf_vpt addition (not in Sohn et al.); these tests pin its semantics on tiny random models: g = 1 is
plain prompted sampling, g = 0 is the frozen model, and any g equals a per-step computation written here from the
definition, with the unprompted logits taken from an untouched copy of the base model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import get_peft_model

import hf_vpt
from hf_vpt import _compat
from hf_vpt.sampling import PromptPrefixCache, autoregressive_sample
from hf_vpt.sampling import autoregressive as autoregressive_module
from hf_vpt.testing_utils import tiny_imagegpt


N_POSITIONS = 16
SOS = 16  # vocab_size - 1
PROMPTS = 3
CLASSES = 4
NUM_TOKENS = 12  # SOS + 11 image tokens + 3 prompts fit in the 16 positions of the untouched reference model
LABELS = torch.tensor([2, 0, 3, 2])
# (use_cache, cache_prompt_prefix): the class-prefix cache, prompts in the first forward, no cache at all
CACHE_MODES = [(True, True), (True, False), (False, False)]


def _imagegpt(seed: int = 0) -> transformers.ImageGPTForCausalImageModeling:
    torch.manual_seed(seed)
    return tiny_imagegpt(codebook_size=SOS, n_positions=N_POSITIONS).eval()


def _prompted(base=None):
    base = _imagegpt() if base is None else base
    config = hf_vpt.GenerativePromptConfig(num_prompt_tokens=PROMPTS, num_classes=CLASSES)
    model = get_peft_model(base, config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large random prompts, so that prompted and frozen predictions differ clearly
        for param in model.base_model.generative_prompt_bank["default"].parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _sample(model, seed: int = 0, use_cache: bool = True, cache_prompt_prefix=True, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_tokens", NUM_TOKENS)
    return autoregressive_sample(
        model,
        generator=torch.Generator().manual_seed(seed),
        use_cache=use_cache,
        cache_prompt_prefix=cache_prompt_prefix,
        **kwargs,
    )


def _reference_guided_logits(untouched, prompts, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Per step t, `l_u + g (l_p - l_u)` of the logits predicting token t, from whole-sequence forwards (no cache).

    `l_p`: the untouched model with `inputs_embeds = [prompts - wpe[0]; wte(ids)]` and positions `[0]*p + 0..L-1`
    (the model adds `wpe[0]` to the prompts, which enter without a position). `l_u`: the untouched model on `ids`.
    """
    batch = tokens.shape[0]
    ids = torch.cat([torch.full((batch, 1), SOS), tokens[:, :-1]], dim=1)
    wte, wpe = untouched.transformer.wte, untouched.transformer.wpe
    positions = torch.cat([torch.zeros(PROMPTS, dtype=torch.long), torch.arange(ids.shape[1])])
    with torch.no_grad():
        embeds = torch.cat([prompts - wpe.weight[0], wte(ids)], dim=1)
        prompted = untouched(inputs_embeds=embeds, position_ids=positions.expand(batch, -1), use_cache=False).logits
        prompted = prompted[:, PROMPTS:]
        unprompted = untouched(input_ids=ids, use_cache=False).logits
    return unprompted + scale * (prompted - unprompted)


class _RecordSampledLogits:
    """Wraps the sampler's `sample_categorical` and keeps the logits of every step (`[B, steps, V]`)."""

    def __init__(self, monkeypatch):
        self.steps: list[torch.Tensor] = []
        original = autoregressive_module.sample_categorical

        def recording(logits, generator, **kwargs):
            self.steps.append(logits.detach().clone())
            return original(logits, generator, **kwargs)

        monkeypatch.setattr(autoregressive_module, "sample_categorical", recording)

    def take(self) -> torch.Tensor:
        stacked = torch.stack(self.steps, dim=1)
        self.steps.clear()
        return stacked


@pytest.mark.parametrize("use_cache, cache_prompt_prefix", CACHE_MODES)
def test_scale_one_gives_the_prompted_samples(use_cache, cache_prompt_prefix):
    model = _prompted()
    options = {"class_labels": LABELS, "top_k": 8, "use_cache": use_cache, "cache_prompt_prefix": cache_prompt_prefix}
    plain = _sample(model, **options)
    assert torch.equal(_sample(model, guidance_scale=1.0, **options), plain)
    assert torch.equal(_sample(model, guidance_scale=1, seed=5, **options), _sample(model, seed=5, **options))
    # the guided samples really differ from g = 1 elsewhere: the unprompted branch is not a no-op
    assert not torch.equal(_sample(model, guidance_scale=3.0, **options), plain)


@pytest.mark.parametrize("use_cache, cache_prompt_prefix", CACHE_MODES)
def test_scale_zero_gives_the_frozen_models_samples(use_cache, cache_prompt_prefix):
    model = _prompted()
    options = {"top_k": 8, "use_cache": use_cache, "cache_prompt_prefix": cache_prompt_prefix}
    guided = _sample(model, class_labels=LABELS, guidance_scale=0.0, **options)
    frozen = _sample(_imagegpt(), batch_size=len(LABELS), **options)
    assert torch.equal(guided, frozen)
    with model.disable_adapter():
        assert torch.equal(_sample(model, batch_size=len(LABELS), **options), frozen)
    assert not torch.equal(_sample(model, class_labels=LABELS, **options), frozen)  # the prompts do matter


@pytest.mark.parametrize("use_cache, cache_prompt_prefix", CACHE_MODES)
@pytest.mark.parametrize("scale", [2.5, -0.5])
def test_guided_logits_match_a_per_step_reference(monkeypatch, use_cache, cache_prompt_prefix, scale):
    untouched = _imagegpt()
    model = _prompted(copy.deepcopy(untouched))
    generator = model.base_model.generative_prompt_bank["default"].generators["generative"]
    with torch.no_grad():
        prompts = generator(LABELS)
    recorder = _RecordSampledLogits(monkeypatch)
    options = {"use_cache": use_cache, "cache_prompt_prefix": cache_prompt_prefix}

    tokens = _sample(model, class_labels=LABELS, guidance_scale=scale, top_k=8, **options)
    recorded = recorder.take()
    expected = _reference_guided_logits(untouched, prompts, tokens, scale)
    assert recorded.shape == expected.shape == (len(LABELS), NUM_TOKENS, SOS)
    torch.testing.assert_close(recorded, expected, atol=2e-5, rtol=2e-5)

    # greedy decoding picks the argmax of the reference guided logits at every step (teacher-forced on its tokens)
    greedy = _sample(model, class_labels=LABELS, guidance_scale=scale, temperature=0, **options)
    recorder.take()
    reference = _reference_guided_logits(untouched, prompts, greedy, scale)
    assert torch.equal(greedy, reference.argmax(dim=-1))
    unguided = _sample(model, class_labels=LABELS, temperature=0, **options)
    assert not torch.equal(greedy, unguided)


def test_guidance_keeps_a_separate_unprompted_cache(monkeypatch):
    """With the class-prefix cache, the unprompted forwards never see a cache that holds prompt positions."""
    model = _prompted()
    prefixes = PromptPrefixCache(model)
    seen = []
    base = model.get_base_model()

    def record(module, args, kwargs):
        if "input_ids" not in kwargs:  # the one prefix forward of the prompts alone (inputs_embeds, no token)
            return
        length = _compat.cache_length(_compat.find_cache(module, args, kwargs))  # `past_key_values` or `cache`
        seen.append((model.base_model._prompting(model.base_model._towers[0]), kwargs["input_ids"].shape[1], length))

    handle = base.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _sample(model, class_labels=LABELS, guidance_scale=2.0, num_tokens=4, cache_prompt_prefix=prefixes)
    finally:
        handle.remove()
    prompted = [(ids, past) for on, ids, past in seen if on]
    unprompted = [(ids, past) for on, ids, past in seen if not on]
    # the prompted branch starts from the p cached prompt positions, the unprompted one from nothing
    assert prompted == [(1, PROMPTS + t) for t in range(4)]
    assert unprompted == [(1, t) for t in range(4)]
    assert prefixes.num_prefix_forwards == 1


def test_guidance_errors_name_the_problem():
    model = _prompted()
    with pytest.raises(ValueError, match="PeftModel"):
        _sample(_imagegpt(), batch_size=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="PeftModel"):
        _sample(model.base_model, class_labels=LABELS, guidance_scale=2.0)  # the tuner has no disable_adapter()
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="finite number"):
            _sample(model, class_labels=LABELS, guidance_scale=bad)
    with model.disable_adapter(), pytest.raises(ValueError, match="no enabled adapter"):
        _sample(model, class_labels=LABELS, guidance_scale=2.0)
    # a failed call leaves the adapter enabled and sampling unchanged
    assert torch.equal(_sample(model, class_labels=LABELS), _sample(_prompted(), class_labels=LABELS))
