"""MaskGIT iterative decoding (Chang et al., CVPR 2022) with generative prompts.

Decoding starts from an all-masked token grid. At step `t = 0 .. T-1` the model predicts every position; a token is
drawn for every masked position; the confidence of a drawn token is its log-probability plus Gumbel noise scaled by
the choice temperature `t_c · (1 - (t + 1) / T)` (annealed linearly to 0, as in the released code of Sohn et al.,
`t_c = 4.5`); then the `floor(N · cos(π/2 · (t + 1) / T))` least confident new tokens are masked again. Tokens fixed
at earlier steps are never changed. After the last step no token is masked.

The loop calls the transformer directly, so it needs neither diffusers' deprecated `AmusedPipeline` nor its
scheduler. For aMUSEd's `UVit2DModel` the text conditioning is passed through `model_kwargs` (for class-conditional
transfer, e.g. the CLIP embeddings of an empty prompt, repeated over the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_model_kind, check_non_negative, class_label_tensor
from ._random import gumbel, sample_categorical


@dataclass
class MaskGITOutput:
    tokens: torch.Tensor  # [B, H, W] (or [B, N]) token ids in [0, codebook_size)
    images: torch.Tensor | None = None  # [B, 3, H', W'] in [0, 1] when a VQ model decoded the tokens


def _logits_per_token(output, batch: int, num_tokens: int) -> torch.Tensor:
    """`[B, N, V]` from UVit2D-style `[B, V, H, W]` logits, or from `[B, N, V]` logits as they are."""
    logits = getattr(output, "logits", output)
    if logits.dim() == 4:
        return logits.flatten(2).transpose(1, 2)
    if logits.dim() == 3 and logits.shape[1] == num_tokens:
        return logits
    raise ValueError(f"Cannot read per-token logits from an output of shape {tuple(logits.shape)}.")


@torch.no_grad()
def maskgit_sample(
    model,
    *,
    mask_token_id: int,
    grid_size: tuple[int, int],
    batch_size: int | None = None,
    class_labels: torch.Tensor | None = None,
    num_steps: int = 12,
    choice_temperature: float = 4.5,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None = None,
    vqvae=None,
    guidance_scale: float | None = None,
    device: torch.device | str | None = None,
) -> MaskGITOutput:
    """Sample token grids with a prompted MaskGIT-style model and optionally decode them with a diffusers `VQModel`.

    Args:
        model: the prompted model (a `PeftModel` with a `GenerativePromptConfig` adapter, or any model called as
            `model(input_ids=ids, **model_kwargs)` returning `[B, V, H, W]` logits, such as `UVit2DModel`).
        mask_token_id: the mask id of the model (UVit2D: `vocab_size - 1`).
        grid_size: `(H, W)` of the token grid.
        batch_size: number of samples; defaults to `len(class_labels)`.
        class_labels: one label per sample for class-conditional prompts (passed as `class_labels=`).
        num_steps: number of decoding iterations `T` (MaskGIT: 12).
        choice_temperature: `t_c`, the scale of the Gumbel noise on the confidences at step 0.
        temperature: sampling temperature of the tokens themselves (1: sample from the model's softmax).
        generator: a `torch.Generator`; the same seed gives the same samples.
        model_kwargs: the model's other inputs, with a batch dimension of `batch_size` (UVit2D:
            `encoder_hidden_states`, `pooled_text_emb`, `micro_conds`).
        vqvae: a diffusers `VQModel` with `lookup_from_codebook=True`; if given, the tokens are decoded to images
            (clipped to [0, 1] as aMUSEd does).
        guidance_scale: if set, the logits are `l_u + g · (l_p - l_u)` with `l_p` the prompted and `l_u` the
            frozen model's logits (`model.disable_adapter()`), i.e. classifier-free-style guidance between prompted
            and unprompted predictions. This is not in the paper's released code (it samples from `l_p`); it costs
            a second forward per step. `model` must be a `PeftModel`.
    """
    check_model_kind(model, "maskgit")
    temperature = check_non_negative("temperature", temperature)
    choice_temperature = check_non_negative("choice_temperature", choice_temperature)
    if batch_size is None:
        if class_labels is None:
            raise ValueError("Pass `batch_size`, or `class_labels` with one label per sample.")
        batch_size = len(class_labels)
    if class_labels is not None and len(class_labels) != batch_size:
        raise ValueError(f"`class_labels` has {len(class_labels)} entries for a batch of {batch_size}.")
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be at least 1; got {num_steps}.")
    if guidance_scale is not None and not hasattr(model, "disable_adapter"):
        raise ValueError("`guidance_scale` needs a PeftModel (its `disable_adapter()` gives the unprompted logits).")
    if device is None:
        device = next(iter(model.parameters())).device
    height, width = grid_size
    num_tokens = height * width
    model_kwargs = dict(model_kwargs or {})
    if class_labels is not None:
        model_kwargs["class_labels"] = class_label_tensor(class_labels, device=device)

    tokens = torch.full((batch_size, num_tokens), mask_token_id, dtype=torch.long, device=device)
    unknown = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
    for step in range(num_steps):
        output = model(input_ids=tokens.view(batch_size, height, width), **model_kwargs)
        logits = _logits_per_token(output, batch_size, num_tokens).float()
        if guidance_scale is not None:
            with model.disable_adapter():
                plain = model(input_ids=tokens.view(batch_size, height, width), **model_kwargs)
            plain = _logits_per_token(plain, batch_size, num_tokens).float()
            # lerp is exact at both ends: g = 1 gives the prompted logits, g = 0 the unprompted ones
            logits = torch.lerp(plain, logits, float(guidance_scale))
        sampled = sample_categorical(logits, generator, temperature=temperature)
        sampled = torch.where(unknown, sampled, tokens)
        if step == num_steps - 1:
            tokens = sampled
            break
        ratio = (step + 1) / num_steps
        num_masked = math.floor(num_tokens * math.cos(math.pi / 2 * ratio))
        # keep at least one token masked for the next step, and never mask more than are still unknown minus one
        still_unknown = unknown.sum(dim=1, keepdim=True)
        num_masked = torch.clamp(torch.full_like(still_unknown, num_masked), min=1)
        num_masked = torch.minimum(num_masked, (still_unknown - 1).clamp(min=0))
        log_probs = torch.log_softmax(logits / max(temperature, 1e-6), dim=-1)
        confidence = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        confidence = confidence + choice_temperature * (1.0 - ratio) * gumbel(confidence.shape, generator, device)
        confidence = torch.where(unknown, confidence, torch.full_like(confidence, float("inf")))
        ranks = confidence.argsort(dim=1).argsort(dim=1)  # 0 = least confident
        remask = ranks < num_masked
        tokens = torch.where(remask, torch.full_like(sampled, mask_token_id), sampled)
        unknown = remask
    tokens = tokens.view(batch_size, height, width)
    images = decode_vq_tokens(vqvae, tokens) if vqvae is not None else None
    return MaskGITOutput(tokens=tokens, images=images)


@torch.no_grad()
def decode_vq_tokens(vqvae, tokens: torch.Tensor) -> torch.Tensor:
    """Decode `[B, H, W]` codebook ids with a diffusers `VQModel` into `[B, 3, H', W']` images in [0, 1]."""
    config = vqvae.config
    if not getattr(config, "lookup_from_codebook", False):
        raise ValueError(
            "The VQModel decodes latents, not token ids: build or load it with `lookup_from_codebook=True` "
            "(aMUSEd's VQ-GAN has it) to decode sampled tokens."
        )
    batch, height, width = tokens.shape
    shape = (batch, height, width, config.latent_channels)
    decoded = vqvae.decode(tokens, force_not_quantize=True, shape=shape).sample
    return decoded.clamp(0, 1)
