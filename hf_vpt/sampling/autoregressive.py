"""Autoregressive sampling for a prompted ImageGPT (raster order, one token per step).

`transformers`' `generate()` is not used: it computes position ids from the sequence length, which would count the
prompts. With a `GenerativePromptConfig` adapter the prompts stay in the key/value cache and later steps feed one
token; the adapter keeps the image positions `0 .. L-1`. By default (`cache_prompt_prefix=True`) the cache starts
from the class prefixes of `hf_vpt.sampling.prompt_prefix`: the keys and values of the prompt positions, computed by
one forward of the prompts alone per distinct class and gathered per sample, so no forward of the loop has a prompt
row. With `cache_prompt_prefix=False` the first forward carries every sample's prompts in front of its tokens.

Prompt guidance (`guidance_scale=g`) samples every token from `l_u + g · (l_p - l_u)`, with `l_p` the prompted logits
and `l_u` the logits of the frozen model (`model.disable_adapter()`), the classifier-free-guidance form of aMUSEd's
pipeline applied between prompted and unprompted predictions. It is an hf_vpt addition, not part of Sohn et al.'s
method or code (which sample from `l_p`), and the same option as `maskgit_sample(guidance_scale=...)`. The unprompted
branch keeps its own key/value cache (it never holds prompt positions); each step costs a second forward.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from .._compat import BaseTunerLayer, imagegpt_cache_keyword, output_cache
from ._checks import check_model_kind, check_non_negative, check_top_k, class_label_tensor
from ._random import sample_categorical
from .prompt_prefix import PromptPrefixCache, prompt_prefix_applies


def _config_of(model):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    return config


@torch.no_grad()
def autoregressive_sample(
    model,
    *,
    num_tokens: int | None = None,
    batch_size: int | None = None,
    class_labels: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    sos_token_id: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache_prompt_prefix: bool | PromptPrefixCache = True,
    guidance_scale: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample `[B, num_tokens]` token ids (SOS not included) from a prompted `ImageGPTForCausalImageModeling`.

    Args:
        model: the prompted model (a `PeftModel` or the base model); called with `input_ids`, its key/value cache,
            `use_cache` and, if given, `class_labels`.
        num_tokens: number of tokens to produce, prefix included (default: `n_positions`, a full image).
        batch_size: number of samples; defaults to `len(class_labels)` (or `len(prefix)`).
        class_labels: one label per sample for class-conditional prompts.
        prefix: `[B, k]` known first tokens (image completion); they are returned as they are.
        sos_token_id: the start token (default: `vocab_size - 1`, ImageGPT's SOS).
        temperature: softmax temperature (0: greedy).
        top_k: sample among the k most likely tokens only.
        generator: a `torch.Generator`; the same seed gives the same samples.
        use_cache: reuse keys/values between steps (False recomputes the whole sequence, prompts included, at every
            step).
        cache_prompt_prefix: with `use_cache` and a generative prompt adapter in eval mode, start the key/value cache
            from per-class prompt prefixes (one prompt forward per distinct class) instead of putting every
            sample's prompts through the first forward. A `PromptPrefixCache` of the model keeps the prefixes
            across calls. Same logits (to float rounding) and samples either way; ignored where it does not apply
            (no adapter, adapter disabled, training mode, `use_cache=False`).
        guidance_scale: if set, prompt guidance: every token is drawn from `l_u + g · (l_p - l_u)` (before
            `temperature` and `top_k`), `l_p` the prompted and `l_u` the frozen model's logits
            (`model.disable_adapter()`). `g = 1` gives the prompted samples, `g = 0` the frozen model's, `g > 1`
            pushes further from the unprompted model. Not in the paper's method (an hf_vpt addition, as in
            `maskgit_sample`); it costs a second forward per step, with its own key/value cache. `model` must be a
            `PeftModel`.
    """
    check_model_kind(model, "autoregressive")
    temperature = check_non_negative("temperature", temperature)
    top_k = check_top_k(top_k)
    _check_guidance(model, guidance_scale)
    config = _config_of(model)
    if sos_token_id is None:
        sos_token_id = int(config.vocab_size) - 1
    if num_tokens is None:
        num_tokens = int(config.n_positions)
    if batch_size is None:
        if class_labels is not None:
            batch_size = len(class_labels)
        elif prefix is not None:
            batch_size = prefix.shape[0]
        else:
            raise ValueError("Pass `batch_size`, `class_labels` (one label per sample) or `prefix`.")
    if class_labels is not None and len(class_labels) != batch_size:
        raise ValueError(f"`class_labels` has {len(class_labels)} entries for a batch of {batch_size}.")
    limit = getattr(config, "n_positions", None)
    if limit is not None and num_tokens > int(limit):
        raise ValueError(
            f"ImageGPT has {limit} positions (`n_positions`): the input [SOS, x_1 .. x_(n-1)] predicts at most "
            f"{limit} tokens; `num_tokens={num_tokens}` is too many."
        )
    if device is None:
        device = next(iter(model.parameters())).device
    extra = {}
    if class_labels is not None:
        extra["class_labels"] = class_label_tensor(class_labels, device=device)

    sequence = torch.full((batch_size, 1), sos_token_id, dtype=torch.long, device=device)
    if prefix is not None:
        if prefix.shape[0] != batch_size or prefix.shape[1] > num_tokens:
            raise ValueError(f"`prefix` of shape {tuple(prefix.shape)} does not fit {batch_size} x {num_tokens}.")
        sequence = torch.cat([sequence, prefix.to(device=device, dtype=torch.long)], dim=1)
    cache = None
    if use_cache and cache_prompt_prefix is not False:
        prefixes = cache_prompt_prefix if isinstance(cache_prompt_prefix, PromptPrefixCache) else None
        if prefixes is not None and not prefixes.belongs_to(model):
            raise ValueError("`cache_prompt_prefix` is a PromptPrefixCache of another model.")
        if prompt_prefix_applies(model):
            prefixes = prefixes if prefixes is not None else PromptPrefixCache(model)
            cache = prefixes.for_batch(class_labels=extra.get("class_labels"), batch_size=batch_size)
    plain_cache = None  # the unprompted branch's own cache: prompt positions must never enter it
    cache_keyword = imagegpt_cache_keyword(model) if use_cache else None  # `past_key_values` or, from 5.24, `cache`
    step_input = sequence
    while sequence.shape[1] - 1 < num_tokens:
        if use_cache:
            output = model(input_ids=step_input, use_cache=True, **{cache_keyword: cache}, **extra)
            cache = output_cache(output)
        else:
            output = model(input_ids=sequence, use_cache=False, **extra)
        logits = output.logits[:, -1]
        if guidance_scale is not None:
            with model.disable_adapter():
                if use_cache:
                    plain = model(input_ids=step_input, use_cache=True, **{cache_keyword: plain_cache})
                    plain_cache = output_cache(plain)
                else:
                    plain = model(input_ids=sequence, use_cache=False)
            # lerp is exact at both ends: g = 1 returns the prompted logits, g = 0 the unprompted ones
            logits = torch.lerp(plain.logits[:, -1].float(), logits.float(), float(guidance_scale))
        next_token = sample_categorical(logits, generator, temperature=temperature, top_k=top_k)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
    return sequence[:, 1:]


def _check_guidance(model, guidance_scale) -> None:
    if guidance_scale is None:
        return
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) or not math.isfinite(guidance_scale):
        raise ValueError(
            f"`guidance_scale` must be a finite number (or None for no guidance); got {guidance_scale!r}."
        )
    if not callable(getattr(model, "disable_adapter", None)):
        raise ValueError(
            f"`guidance_scale` needs a PeftModel, whose `disable_adapter()` gives the unprompted logits; got "
            f"{type(model).__name__}. Wrap the model with `peft.get_peft_model(model, GenerativePromptConfig(...))` "
            "(or load the adapter with `PeftModel.from_pretrained`), or leave `guidance_scale=None`."
        )
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    if not layers or any(layer.disable_adapters for layer in layers):
        raise ValueError(
            "`guidance_scale` mixes prompted and unprompted logits, but the model has no enabled adapter (called "
            "inside `model.disable_adapter()`?): both branches would be the frozen model. Sample outside that "
            "context, or leave `guidance_scale=None`."
        )


def imagegpt_tokens_to_images(tokens: torch.Tensor, clusters, height: int, width: int) -> np.ndarray:
    """`[B, H·W]` ImageGPT colour-cluster ids -> `uint8` images `[B, H, W, 3]`.

    `clusters` is the `[512, 3]` palette in [-1, 1] of `ImageGPTImageProcessor.clusters`.
    """
    palette = np.asarray(clusters, dtype=np.float32)
    pixels = palette[tokens.detach().cpu().numpy()].reshape(tokens.shape[0], height, width, 3)
    return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
