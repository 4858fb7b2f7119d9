"""Sequence surgery: put prompt tokens into a token sequence and take them out again.

Every hf_vpt method inserts `p` tokens at position `at` (right after the special tokens), lets frozen blocks run on
the longer sequence, and removes them before anything downstream sees the sequence. These functions are the only
place that knows the layout `[special tokens, prompts, other tokens]`.
"""

from __future__ import annotations

import torch
from transformers.utils import ModelOutput


def insert_tokens(hidden: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
    """`[h[:, :at], tokens, h[:, at:]]` along the sequence dimension."""
    return torch.cat([hidden[:, :at], tokens, hidden[:, at:]], dim=1)


def replace_tokens(hidden: torch.Tensor, tokens: torch.Tensor, at: int) -> torch.Tensor:
    """Overwrite the `tokens.shape[1]` positions starting at `at` (VPT-deep's per-block prompt replacement)."""
    count = tokens.shape[1]
    return torch.cat([hidden[:, :at], tokens, hidden[:, at + count :]], dim=1)


def remove_tokens(hidden: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """Drop positions `[at, at + count)` along the sequence dimension."""
    return torch.cat([hidden[:, :at], hidden[:, at + count :]], dim=1)


def extend_attention_mask(mask: torch.Tensor | None, at: int, count: int) -> torch.Tensor | None:
    """Open `count` new positions at `at` in a 2-D padding mask `[B, K]` or a 4-D mask `[B, h, Q, K]`.

    New positions are visible to every query and see every key that is not masked for the query they were cloned
    from; the values are taken from position `at - 1` (a special token) when there is one, otherwise from `at`.
    """
    if mask is None:
        return None
    source = max(at - 1, 0)
    if mask.dim() == 2:
        new = mask[:, source : source + 1].expand(-1, count)
        return torch.cat([mask[:, :at], new, mask[:, at:]], dim=1)
    if mask.dim() == 4:
        new_cols = mask[..., source : source + 1].expand(*mask.shape[:-1], count)
        mask = torch.cat([mask[..., :at], new_cols, mask[..., at:]], dim=-1)
        if mask.shape[-2] > 1:  # a mask with one query row broadcasts over queries
            new_rows = mask[..., source : source + 1, :].expand(*mask.shape[:-2], count, mask.shape[-1])
            mask = torch.cat([mask[..., :at, :], new_rows, mask[..., at:, :]], dim=-2)
        return mask
    raise ValueError(f"Cannot extend an attention mask with {mask.dim()} dimensions; expected 2 or 4.")


def _strip_tensor(tensor, at: int, count: int, prompted_length: int):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.dim() == 3 and tensor.shape[1] == prompted_length:  # hidden states [B, L, d]
        return remove_tokens(tensor, at, count)
    if tensor.dim() == 4 and tensor.shape[-1] == prompted_length and tensor.shape[-2] == prompted_length:
        tensor = torch.cat([tensor[..., :at], tensor[..., at + count :]], dim=-1)  # attention maps [B, h, L, L]
        return torch.cat([tensor[..., :at, :], tensor[..., at + count :, :]], dim=-2)
    return tensor


def _strip_tuple(values, at: int, count: int, prompted_length: int):
    return tuple(_strip_tensor(v, at, count, prompted_length) for v in values)


def strip_recorded_outputs(output, at: int, count: int, prompted_length: int):
    """Remove prompt positions from the per-layer `hidden_states` and `attentions` a tower returns.

    transformers records them with hooks on the original block and attention classes, which run inside hf_vpt's
    wrappers and therefore see the prompted sequence. Tensors are recognised by their prompted length.
    """
    if isinstance(output, ModelOutput):
        for key in ("hidden_states", "attentions"):
            if isinstance(output.get(key), tuple):
                output[key] = _strip_tuple(output[key], at, count, prompted_length)
        return output
    if isinstance(output, tuple):
        return tuple(
            _strip_tuple(v, at, count, prompted_length) if isinstance(v, tuple) else v for v in output
        )
    return output
