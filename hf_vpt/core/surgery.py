"""Sequence surgery: put prompt tokens into a token sequence and take them out again.

Every hf_vpt method inserts `p` tokens at position `at` (right after the special tokens), lets frozen blocks run on
the longer sequence, and removes them before anything downstream sees the sequence. These functions are the only
place that knows the layout `[special tokens, prompts, other tokens]`.
"""

from __future__ import annotations

import torch

from .._compat import ModelOutput


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


def extend_attention_mask(mask: torch.Tensor | None, at: int, count: int, causal: bool = False) -> torch.Tensor | None:
    """Open `count` new positions at `at` in a 2-D padding mask `[B, K]` or a 4-D mask `[B, h, Q, K]`.

    New positions are visible to every query and see every key that is not masked for the query they were cloned
    from; the values are taken from position `at - 1` (a special token) when there is one, otherwise from `at`.

    With `causal=True` (a causal tower such as CLIP's text encoder, whose 4-D mask is causal plus key padding) the
    new positions are ordinary causal positions `at .. at + count - 1` of the longer sequence instead: later tokens
    see them, earlier ones (the special tokens before `at`) do not, and each prompt sees the special tokens and the
    prompts up to itself. This is exactly what `is_causal=True` gives an SDPA call without a mask, so eager and
    SDPA attention agree.
    """
    if mask is None:
        return None
    if causal and mask.dim() == 4 and mask.shape[-2] == mask.shape[-1] > 1:
        return _extend_causal_mask(mask, at, count)
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


def _extend_causal_mask(mask: torch.Tensor, at: int, count: int) -> torch.Tensor:
    """`[B, h, L, L]` causal (+ key padding) mask -> `[B, h, L + count, L + count]` with causal prompt positions."""
    length = mask.shape[-1]
    positions = torch.arange(length + count, device=mask.device)
    is_new = (positions >= at) & (positions < at + count)
    # Old positions keep their own rows/columns (padding included); new rows start as a copy of the last special
    # token's row, which hides every later key, and new columns are overwritten below.
    source = torch.where(positions < at, positions, positions - count)
    source = torch.where(is_new, max(at - 1, 0), source)
    extended = mask.index_select(-2, source).index_select(-1, source)
    values = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    visible, hidden = (torch.tensor(v, dtype=mask.dtype, device=mask.device) for v in values)
    causal = positions[:, None] >= positions[None, :]
    new_columns = torch.where(causal, visible, hidden)  # prompts are never padding
    extended = torch.where(is_new[None, :], new_columns, extended)
    if at == 0:  # no special token to copy from: a new row sees no old key (all of them come later)
        extended = torch.where(is_new[:, None] & ~is_new[None, :], hidden, extended)
    return extended


def _strip_tensor(tensor, at: int, count: int, prompted_length: int):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.dim() == 3 and tensor.shape[1] == prompted_length:  # hidden states [B, L, d]
        return remove_tokens(tensor, at, count)
    if tensor.dim() == 4 and tensor.shape[-1] == prompted_length and tensor.shape[-2] == prompted_length:
        tensor = torch.cat([tensor[..., :at], tensor[..., at + count :]], dim=-1)  # attention maps [B, h, L, L]
        return torch.cat([tensor[..., :at, :], tensor[..., at + count :, :]], dim=-2)
    if tensor.dim() == 4 and tensor.shape[-1] == prompted_length and tensor.shape[-2] == prompted_length - count:
        return torch.cat([tensor[..., :at], tensor[..., at + count :]], dim=-1)  # key/value-prefix maps [B, h, N, L]
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
        return tuple(_strip_tuple(v, at, count, prompted_length) if isinstance(v, tuple) else v for v in output)
    return output
