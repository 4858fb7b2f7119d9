"""Sampling loops for generative prompt tuning: MaskGIT iterative decoding and autoregressive sampling."""

from .autoregressive import autoregressive_sample, imagegpt_tokens_to_images
from .maskgit import MaskGITOutput, decode_vq_tokens, maskgit_sample
from .prompt_prefix import PromptPrefixCache, prompt_prefix_applies, prompt_prefix_cache


__all__ = [
    "MaskGITOutput",
    "PromptPrefixCache",
    "autoregressive_sample",
    "decode_vq_tokens",
    "imagegpt_tokens_to_images",
    "maskgit_sample",
    "prompt_prefix_applies",
    "prompt_prefix_cache",
]
