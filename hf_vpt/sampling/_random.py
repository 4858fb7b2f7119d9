"""Seeded randomness shared by the samplers: every draw comes from the caller's `torch.Generator`."""

from __future__ import annotations

import torch


def uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (so a CPU generator works with a GPU model), moved to `device`."""
    noise_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)


def gumbel(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise `-log(-log(U))`, clamped away from 0 and 1."""
    u = uniform(shape, generator, device).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def sample_categorical(
    logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """One draw per row of `logits[..., V]` from `softmax(logits / temperature)` (restricted to the top k).

    Gumbel-max: `argmax(logits / T + G)` is distributed as the softmax; `temperature=0` is greedy decoding.
    """
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    return (logits / temperature + gumbel(logits.shape, generator, logits.device)).argmax(dim=-1)
