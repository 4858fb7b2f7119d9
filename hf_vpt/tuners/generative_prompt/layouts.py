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

from ...layouts import ArchitectureSpec, Tower, _find_block_list
from .config import GENERATIVE_TOWER_KIND


UVIT2D = ArchitectureSpec("aMUSEd UVit2DModel (diffusers)", ("UVit2DModel",), GENERATIVE_TOWER_KIND, lambda c: 0)
IMAGEGPT = ArchitectureSpec("ImageGPT (transformers)", ("ImageGPTModel",), GENERATIVE_TOWER_KIND, lambda c: 0)
GENERATIVE_ARCHITECTURES: tuple[ArchitectureSpec, ...] = (UVIT2D, IMAGEGPT)


def supported_generative_architectures_message() -> str:
    return (
        "GenerativePromptConfig supports diffusers `UVit2DModel` (the transformer of aMUSEd) and transformers "
        "`ImageGPTModel` / `ImageGPTForCausalImageModeling`."
    )


def _config_value(config, name: str) -> int:
    value = getattr(config, name, None)
    if value is None and isinstance(config, dict):
        value = config.get(name)
    if value is None:
        raise ValueError(f"The model config has no `{name}`; cannot find its transformer blocks.")
    return int(value)


def find_generative_towers(model: nn.Module) -> list[Tower]:
    """The one generative tower of `model` (a list, as `hf_vpt.layouts.find_towers` returns)."""
    towers: list[Tower] = []
    for name, module in model.named_modules():
        class_name = type(module).__name__
        spec = next((s for s in GENERATIVE_ARCHITECTURES if class_name in s.root_classes), None)
        if spec is None or any(name.startswith(t.name + ".") for t in towers if t.name):
            continue
        config = module.config
        block_list_name, blocks = _find_block_list(module, _config_value(config, "num_hidden_layers"))
        prefix = f"{name}.{block_list_name}" if name else block_list_name
        towers.append(
            Tower(
                spec=spec,
                name=name,
                root=module,
                blocks=blocks,
                block_names=[f"{prefix}.{i}" for i in range(len(blocks))],
                final_norm=None,
                hidden_size=_config_value(config, "hidden_size"),
                num_special_tokens=0,
                patch_area=1,
                config=config,
            )
        )
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
