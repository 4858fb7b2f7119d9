"""Every assumption hf_vpt makes about the internals of transformers, diffusers, peft and torch, in one place.

hf_vpt wraps frozen blocks, replaces attention forwards for the key/value prefix, follows ImageGPT's key/value cache
and extends PEFT's closed `PeftType` enum. None of that is public API, and upstream renames internals between minor
releases (transformers 5.24 renamed ImageGPT's `past_key_values` to `cache`). So:

- every such touch goes through a function of this module (a test scans the rest of the package and fails if an
  upstream internal is used anywhere else);
- `TOUCH_POINTS` lists them, and `check_tower` verifies the ones a tower needs when an adapter is attached, raising
  `UpstreamDriftError` (package, version, model class, what changed, the verified range) instead of letting a
  forward compute something wrong.

`VERIFIED` is the range the drift check (`scripts/check_upstream.sh`) last ran green; keep it, `pyproject.toml` and
the README's compatibility table in step.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_tuner_state_dict_key_prefixes
from peft.utils import AuxiliaryTrainingWrapper, PeftType, register_peft_method
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn
from transformers import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput


__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "SAFETENSORS_WEIGHTS_NAME",
    "TOUCH_POINTS",
    "VERIFIED",
    "WEIGHTS_NAME",
    "AttentionSettings",
    "AuxiliaryTrainingWrapper",
    "BaseTuner",
    "BaseTunerLayer",
    "ImageGPTCall",
    "ModelOutput",
    "PeftType",
    "SwinLayerCall",
    "TouchPoint",
    "UpstreamDriftError",
    "add_peft_type_member",
    "attention_function",
    "attention_settings",
    "block_argument",
    "block_attention_mask",
    "block_checkpoint_function",
    "block_uses_gradient_checkpointing",
    "cache_from_layers",
    "cache_layers",
    "cache_length",
    "call_argument",
    "check_tower",
    "config_attention_dropout",
    "find_cache",
    "imagegpt_cache_keyword",
    "imagegpt_call",
    "imagegpt_causal_buffers",
    "output_cache",
    "parameter_version",
    "pop_causal_flag",
    "register_optimizer_step_post_hook",
    "register_peft_method",
    "replace_attention_forward",
    "restore_attention_forward",
    "set_block_gradient_checkpointing",
    "set_causal_buffer",
    "swin_layer_call",
    "swin_merge_features",
    "tuner_state_dict_key_prefixes",
    "with_block_argument",
    "with_block_attention_mask",
    "with_call_argument",
    "with_imagegpt_call",
    "wrap_peft_model_loading",
]


# Oldest and newest release of each package that the drift check ran green with.
VERIFIED: dict[str, tuple[str, str]] = {
    "transformers": ("5.18.0", "5.24.0"),
    "peft": ("0.21.0", "0.21.2"),
    "diffusers": ("0.36.0", "0.42.1"),
    "accelerate": ("1.15.0", "1.16.0"),
}

# The cache argument of ImageGPT's forwards, by release: `past_key_values` up to 5.23, `cache` from 5.24.
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


class UpstreamDriftError(RuntimeError):
    """An upstream package changed an internal that hf_vpt relies on; the message names package, version and model."""


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def drift_error(package: str, what: str, model_class: str, detail: str) -> UpstreamDriftError:
    oldest, newest = VERIFIED[package]
    return UpstreamDriftError(
        f"hf_vpt has not been verified with {package} {installed_version(package)}'s {what} ({model_class}): "
        f"{detail}. Supported: {package} {oldest} to {newest}. Install a supported release "
        f"(`pip install '{package}>={oldest},<={newest}'`, or `bash scripts/bootstrap.sh` for the tested lock), or "
        "upgrade hf_vpt if a newer one supports it."
    )


@dataclass(frozen=True)
class TouchPoint:
    """One upstream internal hf_vpt depends on. `markers` are the identifiers and strings that spell it in code;
    the touch-point test fails if any of them appears outside this module."""

    name: str
    package: str
    what: str
    markers: tuple[str, ...]


TOUCH_POINTS: tuple[TouchPoint, ...] = (
    TouchPoint(
        "attention interface",
        "transformers",
        "the attention functions registry, the model module's eager fallback and the configured implementation",
        (
            "ALL_ATTENTION_FUNCTIONS",
            "eager_attention_forward",
            "_attn_implementation",
            "get_interface",
            "head_dim",
            "attention_head_size",
            "scaling",
            "attention_dropout",
            "is_causal",
        ),
    ),
    TouchPoint(
        "attention forward replacement",
        "transformers",
        "an attention module's instance `forward` replaced while an adapter is attached (key/value prefix)",
        ("__dict__",),
    ),
    TouchPoint(
        "block call convention",
        "transformers",
        "blocks are called as `block(hidden_states, attention_mask, ...)` and forward `**kwargs` to their attention",
        ("attention_mask",),
    ),
    TouchPoint(
        "adapter file names",
        "peft",
        "the file names PEFT saves adapter weights under (`adapter_model.safetensors`, `adapter_model.bin`), "
        "imported from `peft.utils.constants` through this module",
        (),
    ),
    TouchPoint(
        "attention dropout in configs",
        "transformers",
        "the config field of the attention-probability dropout (`attention_probs_dropout_prob` or "
        "`attention_dropout`)",
        ("attention_probs_dropout_prob",),
    ),
    TouchPoint(
        "ImageGPT cache",
        "transformers",
        "the key/value cache argument of ImageGPT's forwards (`past_key_values` up to 5.23, `cache` from 5.24) and "
        "the cache in its outputs",
        ("past_key_values", "layer_past", "get_seq_length"),
    ),
    TouchPoint(
        "ImageGPT module names",
        "transformers",
        "none: ImageGPT's embeddings are reached through `get_input_embeddings()`, its blocks by structure",
        ("wte", "wpe"),
    ),
    TouchPoint(
        "ImageGPT causal buffer",
        "transformers",
        "the boolean `n_positions x n_positions` causal buffer `bias` of every ImageGPT self-attention",
        ("_buffers",),
    ),
    TouchPoint(
        "DynamicCache layout",
        "transformers",
        "`DynamicCache(config=...)`, `update(keys, values, layer)` and per-layer `keys` / `values`",
        ("DynamicCache",),
    ),
    TouchPoint(
        "gradient checkpointing",
        "transformers",
        "a block's `gradient_checkpointing` flag and its `_gradient_checkpointing_func`",
        ("_gradient_checkpointing_func", "gradient_checkpointing"),
    ),
    TouchPoint(
        "PEFT tuner internals",
        "peft",
        "`BaseTuner` hooks, the state-dict key prefixes of a tuner, `AuxiliaryTrainingWrapper` "
        "(its `original_module`, to put back the head of a refused adapter), and the closed "
        "`PeftType` enum that outside methods must extend",
        ("_get_tuner_state_dict_key_prefixes", "_member_map_", "_value2member_map_", "_member_names_"),
    ),
    TouchPoint(
        "PEFT loading entry points",
        "peft",
        "`PeftModel.load_adapter`, `from_pretrained` and `save_pretrained` wrapped, for hf_vpt adapters only, so that "
        "adapter I/O is safetensors-only and a failed load leaves the model and its earlier adapters as they were",
        (),
    ),
    TouchPoint(
        "model-card hooks",
        "peft",
        "`PeftModel.create_or_update_model_card`, which `transformers.Trainer.create_model_card` calls after writing "
        "its own README.md over an adapter's card, wrapped so hf_vpt merges the two; the Trainer's draft comment "
        "(`transformers.modelcard.AUTOGENERATED_TRAINER_COMMENT`) tells its card from the user's",
        ("create_or_update_model_card", "AUTOGENERATED_TRAINER_COMMENT"),
    ),
    TouchPoint(
        "transformers adapter loading",
        "transformers",
        "`PeftAdapterMixin.load_adapter`, reached by `AutoModel*.from_pretrained(adapter_dir)` and "
        "`pipeline(model=adapter_dir)`, wrapped to refuse hf_vpt adapters with the PEFT call that loads them "
        "(transformers injects only PEFT's own methods); `find_adapter_config_file` finds the adapter's config",
        ("PeftAdapterMixin", "find_adapter_config_file"),
    ),
    TouchPoint(
        "Swin layer internals",
        "transformers",
        "a Swin block's forward `(hidden_states, input_dimensions, always_partition, **kwargs)`, its norms, "
        "attention projections, relative-position bias, padding, cyclic shift and shift mask, the module's "
        "`window_partition` / `window_reverse`, and the patch merging's `norm` + `reduction` (VPT on Swin re-runs the "
        "block with prompts attached to every window)",
        (
            "set_shift_and_window_size",
            "get_attn_mask",
            "cyclic_shift",
            "window_partition",
            "window_reverse",
            "relative_position_bias",
            "layernorm_after",
            "input_dimensions",
            "always_partition",
            "drop_path",
            "maybe_pad",
            "reduction",
        ),
    ),
    TouchPoint(
        "parameter version counter",
        "torch",
        "`Tensor._version`, bumped by every in-place update (cache invalidation)",
        ("_version",),
    ),
    TouchPoint(
        "optimiser step hook",
        "torch",
        "`torch.optim.optimizer.register_optimizer_step_post_hook`, a hook run after every optimiser's `step` "
        "(keeps gated-prompt temperatures in range on the parameters the optimiser updates, sharded or not)",
        ("register_optimizer_step_post_hook", "torch.optim.optimizer"),
    ),
)


# ----------------------------------------------------------------------------------------------------------------
# signatures
# ----------------------------------------------------------------------------------------------------------------
@cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)  # follows functools.wraps (transformers' kwarg-deprecation decorators)


def _forward_parameters(module_class: type) -> tuple[inspect.Parameter, ...]:
    """The parameters of `module_class.forward` after `self`."""
    return _parameters_after_self(module_class.forward)


@cache
def _parameters_after_self(forward: Callable) -> tuple[inspect.Parameter, ...]:
    # keyed by the function, not the class: a class whose forward is replaced is read afresh
    return tuple(_signature(forward).parameters.values())[1:]


def _accepts_var_keyword(module_class: type) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _forward_parameters(module_class))


def _positional_names(module_class: type) -> tuple[str, ...]:
    return _positional_names_of(module_class.forward)


@cache
def _positional_names_of(forward: Callable) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in _parameters_after_self(forward) if p.kind in kinds)


def _signature_class(module: nn.Module) -> type:
    """The class whose forward defines the call's parameters: the module's own, or, for a wrapper whose forward is
    `(*args, **kwargs)` (FSDP1, activation-checkpoint wrappers), the class of the module it wraps."""
    current = module
    for _ in range(4):
        parameters = _forward_parameters(type(current))
        if not parameters or parameters[0].kind is not inspect.Parameter.VAR_POSITIONAL:
            return type(current)
        inner = getattr(current, "_checkpoint_wrapped_module", None) or getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    return type(module)


def call_argument(module: nn.Module, args: tuple, kwargs: dict, name: str):
    """The value of parameter `name` in a call `module(*args, **kwargs)` (None if not given)."""
    if name in kwargs:
        return kwargs[name]
    names = _positional_names(_signature_class(module))
    if name in names and names.index(name) < len(args):
        return args[names.index(name)]
    return None


def with_call_argument(module: nn.Module, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """`(args, kwargs)` of the same call with parameter `name` set to `value` where it was given (or as a kwarg)."""
    names = _positional_names(_signature_class(module))
    if name not in kwargs and name in names and names.index(name) < len(args):
        index = names.index(name)
        return (*args[:index], value, *args[index + 1 :]), kwargs
    return args, {**kwargs, name: value}


def block_argument(block: nn.Module, args: tuple, kwargs: dict, name: str):
    """Like `call_argument` for a block called as `block(hidden_states, *args, **kwargs)` (hidden states split off)."""
    return call_argument(block, (None, *args), kwargs, name)


def with_block_argument(block: nn.Module, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    args, kwargs = with_call_argument(block, (None, *args), kwargs, name, value)
    return args[1:], kwargs


def block_attention_mask(block: nn.Module, args: tuple, kwargs: dict):
    """The attention mask of a block call `block(hidden_states, *args, **kwargs)` (None if none was given)."""
    return block_argument(block, args, kwargs, "attention_mask")


def with_block_attention_mask(block: nn.Module, args: tuple, kwargs: dict, mask) -> tuple[tuple, dict]:
    return with_block_argument(block, args, kwargs, "attention_mask", mask)


# ----------------------------------------------------------------------------------------------------------------
# attention: interface and forward replacement (key/value prefix)
# ----------------------------------------------------------------------------------------------------------------
def attention_function(module: nn.Module) -> Callable:
    """The attention function `module` runs (SDPA, eager, flash, ...), with its model's eager function as fallback,
    exactly as transformers' attention-interface modules choose it."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)


@dataclass(frozen=True)
class AttentionSettings:
    """What the key/value-prefix forward reads off an attention module (the names differ between architectures)."""

    head_size: int
    scale: float | None  # None: 1/sqrt(head_size)
    dropout: float
    causal: bool


def attention_settings(module: nn.Module) -> AttentionSettings | None:
    """Head size, scaling, probability dropout and causality of a transformers attention module; None if it has no
    known head size (then the concatenation path serves it)."""
    head_size = getattr(module, "head_dim", None)
    if head_size is None:
        head_size = getattr(module, "attention_head_size", None)
    if not isinstance(head_size, int):
        return None
    scale = getattr(module, "scaling", None) or getattr(module, "scale", None)
    dropout = getattr(module, "attention_dropout", getattr(module, "dropout", 0.0))
    dropout = dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)
    return AttentionSettings(head_size, scale, dropout, bool(getattr(module, "is_causal", False)))


def config_attention_dropout(config) -> float:
    """The attention-probability dropout of a transformers config (ViT/ViLT and CLIP/SigLIP spell it differently)."""
    for name in ("attention_probs_dropout_prob", "attention_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def pop_causal_flag(kwargs: dict) -> bool | None:
    """Take a per-call `is_causal` override off an attention call's kwargs (None if the caller gave none)."""
    return kwargs.pop("is_causal", None)


def replace_attention_forward(module: nn.Module, forward: Callable) -> None:
    """Give one attention module instance another forward (its class and every other instance keep theirs)."""
    module.forward = forward


def restore_attention_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def _check_interface_attention(module: nn.Module, model_class: str) -> None:
    cls = type(module)
    what = "attention interface"
    names = [p.name for p in _forward_parameters(cls)]
    if names[:2] != ["hidden_states", "attention_mask"] or not _accepts_var_keyword(cls):
        raise drift_error(
            "transformers",
            what,
            model_class,
            f"`{cls.__name__}.forward` is `{_signature(cls.forward)}`, expected `(hidden_states, attention_mask, "
            "**kwargs)`",
        )
    if getattr(sys.modules[cls.__module__], "eager_attention_forward", None) is None:
        raise drift_error("transformers", what, model_class, f"`{cls.__module__}` has no `eager_attention_forward`")
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if not isinstance(implementation, str) and implementation is not None:
        raise drift_error("transformers", what, model_class, "the config's `_attn_implementation` is not a name")
    if not callable(getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)):
        raise drift_error("transformers", what, model_class, "`ALL_ATTENTION_FUNCTIONS.get_interface` is gone")


def _check_bert_style_attention(module: nn.Module, model_class: str) -> None:
    cls = type(module)
    names = [p.name for p in _forward_parameters(cls)]
    if names[:3] != ["hidden_states", "attention_mask", "output_attentions"]:
        raise drift_error(
            "transformers",
            "self-attention forward",
            model_class,
            f"`{cls.__name__}.forward` is `{_signature(cls.forward)}`, expected `(hidden_states, attention_mask, "
            "output_attentions)`",
        )


def _check_block(block: nn.Module, model_class: str, needs_kwargs: bool) -> None:
    """A block's mask must be findable by name (a block without a mask parameter is never given one), and a block
    whose attention takes the key/value prefix must pass `**kwargs` on to it."""
    cls = type(block)
    parameters = _forward_parameters(cls)
    names = [p.name for p in parameters]
    opaque = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters) and "attention_mask" not in names
    if opaque or (needs_kwargs and not _accepts_var_keyword(cls)):
        expected = "a named `attention_mask`" if opaque else "`**kwargs` passed on to its attention"
        raise drift_error(
            "transformers",
            "block call convention",
            model_class,
            f"`{cls.__name__}.forward` is `{_signature(cls.forward)}`, expected {expected}",
        )


# ----------------------------------------------------------------------------------------------------------------
# ImageGPT: the cache argument, the cache in outputs, the causal buffer
# ----------------------------------------------------------------------------------------------------------------
def _cache_parameter(module_class: type) -> str | None:
    """The name of the forward's key/value cache parameter, found by annotation (`Cache`) or by a known name."""
    parameters = _forward_parameters(module_class)
    for parameter in parameters:
        annotation = parameter.annotation
        text = annotation if isinstance(annotation, str) else repr(annotation)
        if "Cache" in text and parameter.kind is not inspect.Parameter.VAR_KEYWORD:
            return parameter.name
    return next((p.name for p in parameters if p.name in CACHE_ARGUMENT_NAMES), None)


def find_cache(module: nn.Module, args: tuple, kwargs: dict):
    """The key/value cache of a call `module(*args, **kwargs)`, whatever the argument is called: the forward's cache
    parameter, or any `Cache` object passed (e.g. `past_key_values=` to a forward that renamed it `cache`)."""
    name = _cache_parameter(type(module))
    value = call_argument(module, args, kwargs, name) if name else None
    if value is not None:
        return value
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)


@dataclass
class ImageGPTCall:
    """The arguments of one `ImageGPTModel` call that the generative prompts need, found by the forward's signature."""

    tokens: torch.Tensor | None  # `input_ids` or, if none, `inputs_embeds`
    cache: object | None
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None  # the caller's `attention_mask`


def imagegpt_call(module: nn.Module, args: tuple, kwargs: dict) -> ImageGPTCall:
    tokens = call_argument(module, args, kwargs, "input_ids")
    if tokens is None:
        tokens = call_argument(module, args, kwargs, "inputs_embeds")
    return ImageGPTCall(
        tokens=tokens,
        cache=find_cache(module, args, kwargs),
        position_ids=call_argument(module, args, kwargs, "position_ids"),
        mask=call_argument(module, args, kwargs, "attention_mask"),
    )


def with_imagegpt_call(module: nn.Module, args: tuple, kwargs: dict, position_ids=None, attention_mask=None):
    """`(args, kwargs)` of the same `ImageGPTModel` call with new position ids and/or attention mask."""
    if position_ids is not None:
        args, kwargs = with_call_argument(module, args, kwargs, "position_ids", position_ids)
    if attention_mask is not None:
        args, kwargs = with_call_argument(module, args, kwargs, "attention_mask", attention_mask)
    return args, kwargs


def imagegpt_cache_keyword(model: nn.Module) -> str:
    """The keyword that passes a cache to `model` (a PeftModel or an ImageGPT model) on this transformers."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    base = base.model if isinstance(base, BaseTuner) else base
    name = _cache_parameter(type(base))
    if name is None:
        raise drift_error(
            "transformers",
            "ImageGPT cache",
            type(base).__name__,
            f"`{type(base).__name__}.forward` has no cache "
            f"argument (looked for a `Cache` annotation or {CACHE_ARGUMENT_NAMES})",
        )
    return name


def output_cache(output):
    """The `Cache` of a model output (a `ModelOutput` whatever its field is called, or a tuple); None if none."""
    values = output.values() if isinstance(output, ModelOutput) else output if isinstance(output, tuple) else ()
    return next((v for v in values if isinstance(v, Cache)), None)


def cache_length(cache) -> int:
    """Positions held by a cache (0 for None)."""
    return int(cache.get_seq_length()) if isinstance(cache, Cache) else 0


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(keys, values)` of every layer of a `DynamicCache`, each `[B, heads, positions, head_dim]`."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(config, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A `DynamicCache` holding the given per-layer keys and values."""
    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def imagegpt_causal_buffers(block: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """`(module, buffer)` for every boolean causal buffer `bias` `[1, 1, n, n]` inside an ImageGPT block."""
    found = []
    for module in block.modules():
        buffer = module._buffers.get("bias")
        if (
            isinstance(buffer, torch.Tensor)
            and buffer.dtype == torch.bool
            and buffer.dim() == 4
            and buffer.shape[-1] == buffer.shape[-2]
        ):
            found.append((module, buffer))
    return found


def set_causal_buffer(module: nn.Module, buffer: torch.Tensor) -> None:
    module._buffers["bias"] = buffer


def _check_imagegpt(tower, model_class: str) -> None:
    root_class = type(tower.root)
    if _cache_parameter(root_class) is None:
        raise drift_error(
            "transformers",
            "ImageGPT cache",
            model_class,
            f"`{root_class.__name__}.forward` is `{_signature(root_class.forward)}`: no cache argument (looked for "
            f"a `Cache` annotation or {CACHE_ARGUMENT_NAMES})",
        )
    positional = _positional_names(root_class)
    missing = [n for n in ("input_ids", "attention_mask", "position_ids", "inputs_embeds") if n not in positional]
    if missing:
        raise drift_error(
            "transformers", "ImageGPT forward", model_class, f"`{root_class.__name__}.forward` has no {missing}"
        )
    positions = int(tower.config.n_positions)
    for index, block in enumerate(tower.blocks):
        block = block.get_base_layer() if isinstance(block, BaseTunerLayer) else block
        _check_block(block, model_class, needs_kwargs=False)
        buffers = imagegpt_causal_buffers(block)
        if not buffers or any(b.shape[-1] < positions for _, b in buffers):
            raise drift_error(
                "transformers",
                "ImageGPT causal buffer",
                model_class,
                f"block {index} has no boolean causal buffer `bias` of {positions} x {positions} (`n_positions`)",
            )
    probe = cache_from_layers(tower.config, [(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1))])
    if cache_length(probe) != 2 or cache_layers(probe)[0][0].shape != (1, 1, 2, 1):
        raise drift_error(
            "transformers",
            "DynamicCache layout",
            model_class,
            "a cache built from per-layer keys/values reads back differently",
        )


# ----------------------------------------------------------------------------------------------------------------
# Swin (V1): the pieces of one block that VPT-Swin re-runs with prompts attached to every window
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SwinLayerCall:
    """One Swin block call, resolved: window geometry after the block's own clamping, and its parts."""

    height: int
    width: int
    window_size: int
    shift_size: int
    norm_before: nn.Module
    norm_after: nn.Module
    mlp: nn.Module
    dropout: nn.Module  # the block's hidden dropout (on the attention output and on the MLP output)
    stochastic_depth: nn.Module  # the block's drop path
    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    num_heads: int
    position_bias: Callable[[], torch.Tensor]  # `[1, heads, ws*ws, ws*ws]`
    pad: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...]]]  # `[B, H, W, C]` -> padded, pad values
    shift: Callable[[torch.Tensor, bool], torch.Tensor]  # `(x, reverse)`
    shift_mask: Callable[[int, int, torch.dtype, torch.device], torch.Tensor | None]  # `[nW, ws*ws, ws*ws]` or None
    partition: Callable[[torch.Tensor, int], torch.Tensor]  # `[B, H, W, C]` -> `[B*nW, ws, ws, C]`, batch-major
    reverse: Callable[[torch.Tensor, int, int, int], torch.Tensor]


def swin_layer_call(layer: nn.Module, args: tuple, kwargs: dict) -> SwinLayerCall:
    """Resolve a call `layer(hidden_states, *args, **kwargs)` of a transformers `SwinLayer` as its forward would:
    unless `always_partition`, the block first clamps its window (and drops the shift) when the feature map is not
    larger than the window."""
    cls = type(layer)
    names = [p.name for p in _forward_parameters(cls)]
    module = sys.modules[cls.__module__]
    attention = getattr(layer, "attention", None)
    expected = ("layernorm_before", "layernorm_after", "mlp", "dropout", "drop_path", "window_size", "shift_size")
    if (
        names[:3] != ["hidden_states", "input_dimensions", "always_partition"]
        or not all(hasattr(layer, n) for n in expected)
        or not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias"))
        or not callable(getattr(module, "window_partition", None))
        or not callable(getattr(module, "window_reverse", None))
    ):
        raise drift_error(
            "transformers",
            "Swin block internals",
            cls.__name__,
            f"`{cls.__name__}.forward` is `{_signature(cls.forward)}`; expected `(hidden_states, input_dimensions, "
            "always_partition, **kwargs)` with `layernorm_before/after`, `mlp`, `dropout`, `drop_path` and an "
            "`attention` with `q_proj/k_proj/v_proj/o_proj` and `relative_position_bias`",
        )
    height, width = call_argument(layer, (None, *args), kwargs, "input_dimensions")
    if not call_argument(layer, (None, *args), kwargs, "always_partition"):
        layer.set_shift_and_window_size((height, width))
    window = int(layer.window_size)
    return SwinLayerCall(
        height=int(height),
        width=int(width),
        window_size=window,
        shift_size=int(layer.shift_size),
        norm_before=layer.layernorm_before,
        norm_after=layer.layernorm_after,
        mlp=layer.mlp,
        dropout=layer.dropout,
        stochastic_depth=layer.drop_path,
        attention=attention,
        query=attention.q_proj,
        key=attention.k_proj,
        value=attention.v_proj,
        output=attention.o_proj,
        num_heads=int(attention.num_attention_heads),
        position_bias=attention.relative_position_bias,
        pad=lambda x: layer.maybe_pad(x, x.shape[1], x.shape[2]),
        shift=lambda x, reverse: layer.cyclic_shift(x, reverse=reverse),
        shift_mask=layer.get_attn_mask,
        partition=module.window_partition,
        reverse=module.window_reverse,
    )


def swin_merge_features(merging: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A Swin patch merging's `norm` then `reduction` on already concatenated `[..., 4*C]` features."""
    if not isinstance(getattr(merging, "norm", None), nn.Module) or not isinstance(
        getattr(merging, "reduction", None), nn.Module
    ):
        raise drift_error(
            "transformers", "Swin patch merging", type(merging).__name__, "it has no `norm` and `reduction` modules"
        )
    return merging.reduction(merging.norm(features))


# ----------------------------------------------------------------------------------------------------------------
# gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------
def block_uses_gradient_checkpointing(block: nn.Module) -> bool:
    return bool(getattr(block, "gradient_checkpointing", False))


def set_block_gradient_checkpointing(block: nn.Module, enabled: bool) -> None:
    block.gradient_checkpointing = enabled


def block_checkpoint_function(block: nn.Module) -> Callable:
    """The checkpoint function transformers gave a block when gradient checkpointing was enabled."""
    function = getattr(block, "_gradient_checkpointing_func", None)
    if not callable(function):
        raise drift_error(
            "transformers",
            "gradient checkpointing",
            type(block).__name__,
            "the block has `gradient_checkpointing=True` but no `_gradient_checkpointing_func`",
        )
    return function


# ----------------------------------------------------------------------------------------------------------------
# peft and torch
# ----------------------------------------------------------------------------------------------------------------
def wrap_peft_model_loading(load_adapter: Callable, from_pretrained: Callable, save_pretrained: Callable) -> None:
    """Route `PeftModel.load_adapter`, `from_pretrained` and `save_pretrained` through hf_vpt's guards (idempotent).

    `load_adapter(original, peft_model, model_id, adapter_name, *args, **kwargs)`,
    `from_pretrained(original, cls, model, model_id, *args, **kwargs)` and
    `save_pretrained(original, peft_model, save_directory, *args, **kwargs)` receive PEFT's own function first;
    they must call it unchanged for every adapter that is not hf_vpt's.
    """
    if getattr(PeftModel.load_adapter, "_hf_vpt_guard", False):
        return
    original_load = PeftModel.load_adapter
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_save = PeftModel.save_pretrained

    @functools.wraps(original_save)
    def guarded_save_pretrained(self, save_directory, *args, **kwargs):
        return save_pretrained(original_save, self, save_directory, *args, **kwargs)

    @functools.wraps(original_load)
    def guarded_load_adapter(self, model_id, adapter_name, *args, **kwargs):
        return load_adapter(original_load, self, model_id, adapter_name, *args, **kwargs)

    @functools.wraps(original_from_pretrained)
    def guarded_from_pretrained(cls, model, model_id, *args, **kwargs):
        return from_pretrained(original_from_pretrained, cls, model, model_id, *args, **kwargs)

    guarded_load_adapter._hf_vpt_guard = True
    PeftModel.load_adapter = guarded_load_adapter
    PeftModel.from_pretrained = classmethod(guarded_from_pretrained)
    PeftModel.save_pretrained = guarded_save_pretrained


def tuner_state_dict_key_prefixes(model, adapter_name: str) -> list[str]:
    return list(_get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name))


def add_peft_type_member(member_name: str) -> PeftType:
    """Add `member_name` (name == value) to PEFT's closed `PeftType` enum, idempotently, and return the member.

    PEFT's `register_peft_method` only accepts names that exist in `PeftType` and has no plugin discovery.
    """
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    for view in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(PeftType, view):
            raise drift_error("peft", "PeftType enum", "PeftType", f"the enum has no `{view}`")
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    # Enum keeps three views of its members; all of them must know the new one.
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    return member


def register_optimizer_step_post_hook(hook: Callable) -> torch.utils.hooks.RemovableHandle:
    """Run `hook(optimizer, args, kwargs)` after the `step` of every `torch.optim.Optimizer` in this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook as register

    return register(hook)


def parameter_version(tensor: torch.Tensor) -> int:
    """A counter torch bumps on every in-place update of `tensor` (`copy_`, optimiser steps, `load_state_dict`)."""
    return tensor._version


# ----------------------------------------------------------------------------------------------------------------
# the check run when an adapter is attached
# ----------------------------------------------------------------------------------------------------------------
def check_tower(tower) -> None:
    """Verify every internal this tower's prompting relies on; raise `UpstreamDriftError` on a mismatch.

    Runs before any module is wrapped, so a refused model is left exactly as it was.
    """
    model_class = type(tower.root).__name__
    if tower.spec.windowed:  # resolving one call checks every part VPT-Swin reads, without running the block
        for block in tower.blocks:
            block = block.get_base_layer() if isinstance(block, BaseTunerLayer) else block
            swin_layer_call(block, ((1, 1), True), {})
        for stage in tower.stages:
            if stage.merging is not None and not hasattr(stage.merging, "reduction"):
                raise drift_error("transformers", "Swin patch merging", model_class, "it has no `reduction`")
        return
    if tower.spec.name.startswith("ImageGPT"):
        _check_imagegpt(tower, model_class)
        return
    for block, layout in zip(tower.blocks, tower.attention_layouts or [None] * len(tower.blocks)):
        block = block.get_base_layer() if isinstance(block, BaseTunerLayer) else block
        _check_block(block, model_class, needs_kwargs=layout is not None and layout.passes_kwargs)
    for layout in tower.attention_layouts:
        if layout is None:
            continue
        if layout.passes_kwargs:
            _check_interface_attention(layout.attention, model_class)
        else:
            _check_bert_style_attention(layout.attention, model_class)


def wrap_peft_model_card_update(update: Callable) -> None:
    """Route `PeftModel.create_or_update_model_card(output_dir)` through `update(original, peft_model, output_dir)`
    (idempotent). PEFT calls it from `save_pretrained`, and `transformers.Trainer.create_model_card` calls it right
    after overwriting README.md with its own card."""
    original = PeftModel.create_or_update_model_card
    if getattr(original, "_hf_vpt_guard", False):
        return

    @functools.wraps(original)
    def guarded(self, output_dir):
        return update(original, self, output_dir)

    guarded._hf_vpt_guard = True
    PeftModel.create_or_update_model_card = guarded


@cache
def trainer_card_comment() -> str:
    """The draft comment `transformers.Trainer.create_model_card` writes into every card it generates."""
    from transformers.modelcard import AUTOGENERATED_TRAINER_COMMENT

    return AUTOGENERATED_TRAINER_COMMENT.strip()


_ADAPTER_LOOKUP_KWARGS = ("cache_dir", "token", "revision", "local_files_only", "subfolder")


def adapter_peft_type(peft_model_id, peft_config=None, adapter_kwargs: dict | None = None) -> str | None:
    """The `peft_type` of the adapter transformers is about to load: from `peft_config` when given, else from the
    adapter_config.json transformers finds for `peft_model_id`; None when there is none to read."""
    if peft_config is not None:
        is_dict = isinstance(peft_config, dict)
        value = peft_config.get("peft_type") if is_dict else getattr(peft_config, "peft_type", None)
        return None if value is None else str(getattr(value, "value", value))
    if not isinstance(peft_model_id, (str, os.PathLike)):
        return None
    from transformers.utils import find_adapter_config_file

    kwargs = {k: v for k, v in (adapter_kwargs or {}).items() if k in _ADAPTER_LOOKUP_KWARGS}
    path = find_adapter_config_file(str(peft_model_id), **kwargs)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("peft_type")


def wrap_transformers_adapter_loading(check: Callable) -> None:
    """Call `check(model, peft_model_id, peft_type)` before transformers' `PeftAdapterMixin.load_adapter` (reached by
    `AutoModel*.from_pretrained(adapter_dir)` and `pipeline(model=adapter_dir)`); idempotent."""
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_hf_vpt_guard", False):
        return

    @functools.wraps(original)
    def guarded(self, peft_model_id=None, adapter_name=None, peft_config=None, *args, **kwargs):
        check(self, peft_model_id, adapter_peft_type(peft_model_id, peft_config, kwargs.get("adapter_kwargs")))
        return original(self, peft_model_id, adapter_name, peft_config, *args, **kwargs)

    guarded._hf_vpt_guard = True
    PeftAdapterMixin.load_adapter = guarded
