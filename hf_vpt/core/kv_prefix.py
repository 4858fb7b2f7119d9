"""Deep prompts as batch-shared key/value prefixes: the exact fast path of VPT-deep.

In VPT-deep the outputs at the prompt positions of block i are thrown away before block i+1, so block i's prompts
matter only as keys and values, `k_proj(LN(P_i))` and `v_proj(LN(P_i))`. They do not depend on the sample: computed
once per block and spliced into the keys and values of the real tokens, they give the same attention as inserting
the prompts into the sequence, while the queries, the output projection and the MLP run on the real tokens only.

How the prefix reaches the attention: the block wrapper passes the block's prompts (and where they would sit) as a
keyword argument through the frozen block (transformers blocks forward `**kwargs` to their attention, and gradient
checkpointing replays the same kwargs), and the attention module's instance-level `forward` is replaced, while an
adapter is attached, by `prefix_attention_forward`, which computes `k_proj(LN(P))` and `v_proj(LN(P))` and runs the
module's own projections and its configured attention implementation (SDPA, eager, ...) with the spliced keys and
values, or the untouched forward when no prefix is given.

Why the projection runs inside the attention and not in the block wrapper: under FSDP (1 and 2) and DeepSpeed
ZeRO-3 the transformers block is the usual sharding unit, and its weights (the pre-attention norm, the key and value
projections) are gathered only while the block's own forward runs. The wrapper runs outside that unit, where those
weights are still shards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .._compat import (
    attention_function,
    attention_settings,
    pop_causal_flag,
    replace_attention_forward,
    restore_attention_forward,
)


PREFIX_KWARG = "hf_vpt_kv_prefix"


@dataclass
class KVPrefix:
    """One block's prompts on their way to the attention, which turns them into keys and values."""

    prompts: torch.Tensor  # [1 or B, p, d] in the activations' dtype (1: shared by the whole batch)
    at: int  # where the prompts would sit in the sequence; keeps the concatenation path's key order

    @property
    def count(self) -> int:
        return self.prompts.shape[1]


@dataclass
class AttentionLayout:
    """The parts of one block that the prefix path needs."""

    norm: nn.Module  # the LayerNorm applied before attention
    attention: nn.Module  # the module that owns the q/k/v/o projections
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear | None  # None: BERT-style self-attention whose output projection sits in a sibling module
    head_size: int

    @property
    def passes_kwargs(self) -> bool:
        """Whether the block forwards `**kwargs` to this attention (transformers' attention-interface modules do;
        BERT-style ViLT blocks do not, so their prefix is handed over on the module for the duration of the call)."""
        return self.output is not None


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def find_attention_layout(block: nn.Module, spec) -> AttentionLayout | None:
    """Structure of a pre-norm block whose attention owns its q/k/v projections.

    Two shapes are known: transformers' attention-interface modules (q/k/v/o projections, `config`, a head size) and
    BERT-style self-attention (ViLT: q/k/v and a head size; the output projection lives in a sibling module and runs
    unchanged). Anything else returns None and the concatenation path serves it.
    """
    norm = _child(block, spec.attention_norm_names)
    if not isinstance(norm, nn.LayerNorm):
        return None
    for module in block.modules():
        query, key, value = (_child(module, names) for names in (spec.query_names, spec.key_names, spec.value_names))
        if not all(isinstance(m, nn.Linear) for m in (query, key, value)):
            continue
        output = _child(module, spec.output_names)
        settings = attention_settings(module)
        if settings is None:
            continue
        if isinstance(output, nn.Linear) and hasattr(module, "config"):
            return AttentionLayout(norm, module, query, key, value, output, settings.head_size)
        if output is None and isinstance(getattr(module, "dropout", None), nn.Dropout):
            return AttentionLayout(norm, module, query, key, value, None, settings.head_size)
    return None


def project_prefix(layout: AttentionLayout, prompts: torch.Tensor, at: int) -> KVPrefix:
    """The key/value prefix of `[b, p, d]` prompts for `layout`'s block (b = 1 when they are shared by the whole
    batch). The projection itself is deferred to `prefix_keys_values`, which the block's attention runs inside the
    block's forward, where a sharded block's weights are gathered."""
    if prompts.shape[-1] != layout.key.in_features:
        raise ValueError(f"prompts of width {prompts.shape[-1]} for a block of width {layout.key.in_features}")
    return KVPrefix(prompts, at)


def prefix_keys_values(layout: AttentionLayout, prefix: KVPrefix) -> tuple[torch.Tensor, torch.Tensor]:
    """`k_proj(LN(P))` and `v_proj(LN(P))`, each `[b, heads, p, head_size]`; runs inside the block's forward."""
    normed = layout.norm(prefix.prompts)
    heads_shape = (*prefix.prompts.shape[:2], -1, layout.head_size)
    keys = layout.key(normed).view(heads_shape).transpose(1, 2)
    values = layout.value(normed).view(heads_shape).transpose(1, 2)
    return keys, values


def _splice(states: torch.Tensor, prefix: torch.Tensor, at: int) -> torch.Tensor:
    prefix = prefix.expand(states.shape[0], -1, -1, -1)
    return torch.cat([states[:, :, :at], prefix, states[:, :, at:]], dim=2)


def _prefix_mask(mask, causal: bool, num_queries: int, count: int, at: int, dtype, device) -> torch.Tensor | None:
    """The key mask with the `count` prefix keys opened at `at`.

    Non-causal: every query sees the prefix. Causal (CLIP's text tower): the prompts sit after the first `at` tokens,
    so a query sees them iff it comes after them, exactly as when they are in the sequence.
    """
    if mask is None and not causal:
        return None
    queries = torch.arange(num_queries, device=device)[:, None]
    if mask is None:  # causal attention that relied on `is_causal`: spell it out, keys may no longer equal queries
        allowed = torch.arange(num_queries, device=device)[None, :] <= queries
        mask = torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]
    prompt_visible = (queries >= at) if causal else torch.ones_like(queries, dtype=torch.bool)
    prompt_visible = prompt_visible.expand(num_queries, count)
    if mask.shape[-2] == 1:  # a padding mask broadcast over queries (non-causal only)
        prompt_visible = prompt_visible[:1]
    if mask.dtype == torch.bool:
        new = prompt_visible
    else:
        new = torch.where(prompt_visible, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
    if mask.dim() == 2:  # [B, K] padding mask
        new = new[:1].expand(mask.shape[0], count).to(mask.dtype)
    else:
        new = new.expand(*mask.shape[:-2], *new.shape)
    return torch.cat([mask[..., :at], new, mask[..., at:]], dim=-1)


def prefix_attention_forward(
    layout: AttentionLayout, spec, hidden_states: torch.Tensor, attention_mask=None, **kwargs
):
    module = layout.attention
    prefix: KVPrefix | None = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:
        return type(module).forward(module, hidden_states, attention_mask, **kwargs)
    prefix_keys, prefix_values = prefix_keys_values(layout, prefix)
    settings = attention_settings(module)
    input_shape = hidden_states.shape[:-1]
    heads_shape = (*input_shape, -1, settings.head_size)
    projections = [_child(module, names) for names in (spec.query_names, spec.key_names, spec.value_names)]
    query, key, value = (proj(hidden_states).view(heads_shape).transpose(1, 2) for proj in projections)
    key = _splice(key, prefix_keys.to(key.dtype), prefix.at)
    value = _splice(value, prefix_values.to(value.dtype), prefix.at)
    causal = pop_causal_flag(kwargs)
    causal = settings.causal if causal is None else causal
    attention_mask = _prefix_mask(
        attention_mask, causal, input_shape[-1], prefix.count, prefix.at, query.dtype, query.device
    )
    output, weights = attention_function(module)(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=settings.scale,
        dropout=settings.dropout if module.training else 0.0,
        is_causal=False,  # causality, if any, is in the mask now
        **kwargs,
    )
    output = output.reshape(*input_shape, -1).contiguous()
    return _child(module, spec.output_names)(output), weights


def bert_style_prefix_attention_forward(
    layout: AttentionLayout, spec, hidden_states, attention_mask=None, output_attentions=False
):
    """ViLT's self-attention (scaled dot product, additive mask, dropout on the probabilities) with a prefix."""
    module = layout.attention
    prefix: KVPrefix | None = getattr(module, PREFIX_KWARG, None)
    if prefix is None:
        return type(module).forward(module, hidden_states, attention_mask, output_attentions)
    prefix_keys, prefix_values = prefix_keys_values(layout, prefix)
    head_size = attention_settings(module).head_size
    heads_shape = (*hidden_states.shape[:-1], -1, head_size)
    projections = [_child(module, names) for names in (spec.query_names, spec.key_names, spec.value_names)]
    query, key, value = (proj(hidden_states).view(heads_shape).transpose(1, 2) for proj in projections)
    key = _splice(key, prefix_keys.to(key.dtype), prefix.at)
    value = _splice(value, prefix_values.to(value.dtype), prefix.at)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_size)
    if attention_mask is not None:
        scores = scores + _prefix_mask(
            attention_mask, False, hidden_states.shape[1], prefix.count, prefix.at, scores.dtype, scores.device
        )
    probs = module.dropout(torch.softmax(scores, dim=-1))
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous()
    context = context.view(*context.shape[:-2], -1)
    return (context, probs) if output_attentions else (context,)


@contextmanager
def handed_over(layout: AttentionLayout, prefix: KVPrefix):
    """Give a BERT-style attention its prefix for one block call (its block does not forward keyword arguments)."""
    setattr(layout.attention, PREFIX_KWARG, prefix)  # a plain attribute: not a module, parameter or buffer
    try:
        yield
    finally:
        delattr(layout.attention, PREFIX_KWARG)


def enable_prefix_attention(layout: AttentionLayout, spec) -> None:
    """Let the attention accept a key/value prefix; without one it runs exactly its own forward."""
    forward = prefix_attention_forward if layout.passes_kwargs else bert_style_prefix_attention_forward
    replace_attention_forward(layout.attention, partial(forward, layout, spec))


def disable_prefix_attention(layout: AttentionLayout) -> None:
    restore_attention_forward(layout.attention)
