"""Argument checks shared by the samplers: each names the argument, the value and the fix, before any forward."""

from __future__ import annotations

import math
import numbers

from ..tuners.generative_prompt.generator import class_label_tensor


__all__ = ["check_model_kind", "check_non_negative", "check_top_k", "class_label_tensor"]


def check_non_negative(name: str, value) -> float:
    """A finite number >= 0 (a sampling temperature: 0 is greedy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (0 picks the most likely token); got {value!r}.")
    return float(value)


def check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer (or None to sample from every token); got {top_k!r}.")
    return int(top_k)


def _model_type(model) -> str | None:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(base, "config", None)
    return getattr(config, "model_type", None) or getattr(config, "_class_name", None) or type(base).__name__


def check_model_kind(model, sampler: str) -> None:
    """Refuse the other family of generator: ImageGPT is autoregressive, UVit2D (aMUSEd) decodes in parallel."""
    kind = str(_model_type(model))
    autoregressive = kind.lower() == "imagegpt" or "ImageGPT" in kind
    if sampler == "maskgit" and autoregressive:
        raise ValueError(
            "`maskgit_sample` decodes MaskGIT-style models (UVit2D) in parallel, but the model is an ImageGPT, which "
            "predicts one token after the other: use `hf_vpt.sampling.autoregressive_sample(model, ...)`."
        )
    if sampler == "autoregressive" and not autoregressive and "UVit2D" in kind:
        raise ValueError(
            "`autoregressive_sample` samples ImageGPT token by token, but the model is a UVit2D (MaskGIT-style): "
            "use `hf_vpt.sampling.maskgit_sample(model, mask_token_id=..., grid_size=...)`."
        )
