"""The generative image transformers that `GenerativePromptConfig` prompts, found by structure.

They are kept out of `hf_vpt.layouts.SUPPORTED_ARCHITECTURES` on purpose: the other methods prompt encoders, and
none of them should pick up a token-generating model. Each entry below is an ordinary `ArchitectureSpec` whose tower
kind is `"generative"`; the block list is found as for every other tower (the one `ModuleList` of
`num_hidden_layers` identical blocks).

- diffusers `UVit2DModel` (aMUSEd): the blocks are `transformer_layers`. Their input is the output of
  `project_to_hidden` and their output goes to `project_from_hidden_norm`, so prompts inserted before block 0 and
  removed after the last block never reach the convolutional blocks or the `(B, H·W, C) -> (B, H, W, C)` reshape.
  The stack has no position embedding; prompts go first.
- transformers `ImageGPTModel`: the blocks are `h`; prompts go before the SOS token, after `wte + wpe`, so image
  tokens keep their pretrained positions. Every self-attention holds a causal buffer `bias` of
  `n_positions x n_positions`; `GenerativePromptModel` enlarges it (a non-persistent buffer, restored by
  `unload()`) so that `p` prompts fit in front of a full-length image.
"""

from __future__ import annotations

from torch import nn

from ...layouts import ArchitectureSpec, Tower, find_towers_of
from .config import GENERATIVE_TOWER_KIND


UVIT2D = ArchitectureSpec("aMUSEd UVit2DModel (diffusers)", ("UVit2DModel",), GENERATIVE_TOWER_KIND, lambda c: 0)
IMAGEGPT = ArchitectureSpec("ImageGPT (transformers)", ("ImageGPTModel",), GENERATIVE_TOWER_KIND, lambda c: 0)
GENERATIVE_ARCHITECTURES: tuple[ArchitectureSpec, ...] = (UVIT2D, IMAGEGPT)


def supported_generative_architectures_message() -> str:
    return (
        "GenerativePromptConfig supports diffusers `UVit2DModel` (the transformer of aMUSEd) and transformers "
        "`ImageGPTModel` / `ImageGPTForCausalImageModeling`."
    )


def find_generative_towers(model: nn.Module) -> list[Tower]:
    """The one generative tower of `model` (a list, as `hf_vpt.layouts.find_towers` returns)."""
    towers = find_towers_of(model, GENERATIVE_ARCHITECTURES, encoder=False)
    if not towers:
        raise ValueError(
            f"{type(model).__name__} contains no generative image transformer. "
            + supported_generative_architectures_message()
        )
    if len(towers) > 1:
        raise ValueError(
            f"{type(model).__name__} contains {len(towers)} generative transformers ({[t.name for t in towers]}); "
            "wrap the one to prompt."
        )
    return towers
