"""Training objectives of generative prompt tuning.

- Non-autoregressive (MaskGIT / aMUSEd `UVit2DModel`): per sample draw `r ~ U(0, 1)`, mask `round(cos(π r / 2) · N)`
  (at least one) random tokens with the mask id, and take the cross-entropy, with label smoothing 0.1 as in the
  paper's code, on the masked positions only.
- Autoregressive (ImageGPT): next-token cross-entropy over `[SOS, x_1 .. x_{L-1}] -> [x_1 .. x_L]`.

Only the prompt generator is trained; the helpers take the prompted model (a `PeftModel` or the tuner) and pass
`class_labels` through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100


def cosine_mask_schedule(ratio: torch.Tensor | float) -> torch.Tensor:
    """MaskGIT's cosine schedule: the fraction of masked tokens at `ratio` in [0, 1] (1 at 0, 0 at 1)."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    return torch.cos(math.pi / 2 * ratio)


def random_token_mask(
    batch_size: int,
    num_tokens: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_masking_rate: float = 0.0,
) -> torch.Tensor:
    """`[B, N]` boolean mask with `max(1, round(cos(π r / 2) · N))` random positions per sample, `r ~ U(0, 1)`."""
    noise_device = generator.device if generator is not None else device
    ratios = torch.rand(batch_size, generator=generator, device=noise_device)
    fraction = cosine_mask_schedule(ratios).clamp(min=min_masking_rate)
    num_masked = (fraction * num_tokens).round().clamp(min=1, max=num_tokens).long()
    scores = torch.rand(batch_size, num_tokens, generator=generator, device=noise_device)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation of 0..N-1 per sample
    return (ranks < num_masked[:, None]).to(device)


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Cross-entropy on the masked positions only.

    Args:
        logits: `[B, V, *grid]` (UVit2D's layout, e.g. `[B, V, H, W]`) or `[B, N, V]`.
        targets: token ids, `[B, *grid]` or `[B, N]`.
        mask: boolean, the shape of `targets`; True where the input was masked.
    """
    if logits.dim() == targets.dim() + 1 and logits.shape[1:-1] == targets.shape[1:]:
        logits = logits.movedim(-1, 1)  # [B, N, V] -> [B, V, N]
    if logits.shape[2:] != targets.shape[1:] or mask.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask {tuple(mask.shape)} do not fit; "
            "expected logits [B, V, *grid] (or [B, N, V]) with targets and mask [B, *grid]."
        )
    labels = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)


@dataclass
class MaskedTokenLossOutput:
    loss: torch.Tensor
    mask: torch.Tensor  # True where tokens were masked (and scored)
    logits: torch.Tensor


def maskgit_loss(
    model,
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    class_labels: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    min_masking_rate: float = 0.0,
    generator: torch.Generator | None = None,
    **model_kwargs,
) -> MaskedTokenLossOutput:
    """One masked-token training loss of a prompted non-autoregressive model (e.g. aMUSEd's `UVit2DModel`).

    Args:
        model: the prompted model; called as `model(input_ids=masked_ids, class_labels=..., **model_kwargs)` and
            returning logits `[B, V, *grid]` (or an output with `.logits`).
        input_ids: the clean token ids, `[B, H, W]` or `[B, N]`.
        mask_token_id: the id that replaces masked tokens (UVit2D: `vocab_size - 1`).
        model_kwargs: the model's other inputs (UVit2D: `encoder_hidden_states`, `pooled_text_emb`, `micro_conds`).
    """
    batch = input_ids.shape[0]
    flat = input_ids.reshape(batch, -1)
    mask = random_token_mask(
        batch, flat.shape[1], generator=generator, device=input_ids.device, min_masking_rate=min_masking_rate
    ).view_as(input_ids)
    masked_ids = torch.where(mask, torch.full_like(input_ids, mask_token_id), input_ids)
    if class_labels is not None:
        model_kwargs["class_labels"] = class_labels
    output = model(input_ids=masked_ids, **model_kwargs)
    logits = getattr(output, "logits", output)
    loss = masked_token_loss(logits, input_ids, mask, label_smoothing=label_smoothing)
    return MaskedTokenLossOutput(loss=loss, mask=mask, logits=logits)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: `logits[:, t]` predicts `input_ids[:, t + 1]` (ImageGPT's own shift).

    `logits` are `[B, L, V]` for `input_ids` `[B, L]` (the SOS token first). Targets outside `[0, V)` (the SOS id
    512 of ImageGPT is outside its 512-way head) are ignored.
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    invalid = (targets < 0) | (targets >= shifted.shape[-1])
    targets = torch.where(invalid, torch.full_like(targets, IGNORE_INDEX), targets)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def autoregressive_loss(
    model, input_ids: torch.Tensor, *, class_labels: torch.Tensor | None = None, **model_kwargs
) -> torch.Tensor:
    """Next-token loss of a prompted ImageGPT on `input_ids = [SOS, x_1, ..., x_{L-1}]`."""
    if class_labels is not None:
        model_kwargs["class_labels"] = class_labels
    model_kwargs.setdefault("use_cache", False)
    output = model(input_ids=input_ids, **model_kwargs)
    return next_token_loss(output.logits, input_ids)
