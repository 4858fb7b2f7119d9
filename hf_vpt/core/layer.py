"""The PEFT tuner layer that wraps one transformer block of a prompted tower."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import BaseTunerLayer, block_attention_mask, with_block_attention_mask
from .surgery import extend_attention_mask


class PromptedBlock(nn.Module, BaseTunerLayer):
    """Wraps a frozen block; methods subclass it and implement `enter` (before the block) and `leave` (after it).

    The block owns no parameters: prompts live on the tuner in one path-free tensor per adapter, so the wrapper only
    knows its position (`tower_index`, `block_index`) and asks the tuner for the current forward's state.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("prompted_adapters",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, tuner, tower_index: int, block_index: int):
        super().__init__()
        self.base_layer = base_layer
        self.tower_index = tower_index
        self.block_index = block_index
        self.prompted_adapters: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        # A plain reference, not a submodule: the tuner owns this block, not the other way round.
        object.__setattr__(self, "_tuner", tuner)
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        self.prompted_adapters[adapter_name] = True

    def _get_available_adapters(self) -> set[str]:
        # PEFT's default reads `adapter_layer_names`, which is empty here (the prompts live on the tuner), so
        # `get_layer_status` / `get_model_status` would report no available adapters at all.
        return set(self.prompted_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._tuner._check_merge_allowed()

    def unmerge(self) -> None:
        pass

    # diffusers pipelines scale every `BaseTunerLayer` of their text encoder by the LoRA scale
    # (`cross_attention_kwargs={"scale": s}` -> `scale_lora_layers` / `unscale_lora_layers`). Prompts have no scale,
    # so these are no-ops: a LoRA scale meant for the UNet must not crash or change a prompt-tuned text encoder.
    def scale_layer(self, scale: float) -> None:
        pass

    def unscale_layer(self, scale: float | None = None) -> None:
        pass

    def set_scale(self, adapter: str, scale: float) -> None:
        pass

    @property
    def tower(self):
        return self._tuner._towers[self.tower_index]

    @property
    def is_last_block(self) -> bool:
        return self.block_index == self.tower.num_layers - 1

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.block_index == 0:
            run = self._tuner._begin_tower_forward(self.tower_index, hidden_states, self.active_adapters)
        else:
            run = self._tuner._tower_forward_state(self.tower_index)
            if run is None:  # the block is called on its own, outside its tower: nothing to prompt
                return self.base_layer(hidden_states, *args, **kwargs)
        block_input = self.enter(run, hidden_states)
        args, kwargs = self._extend_masks(run, block_input, args, kwargs)
        output = self._call_base_layer(run, block_input, args, kwargs)
        if isinstance(output, tuple):
            return (self.leave(run, block_input, output[0]), *output[1:])
        return self.leave(run, block_input, output)

    def enter(self, run, hidden_states: torch.Tensor) -> torch.Tensor:
        """The sequence that goes into the frozen block (prompts inserted or replaced)."""
        raise NotImplementedError

    def leave(self, run, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        """The sequence handed to the next block (prompts kept, mixed, or removed after the last block)."""
        raise NotImplementedError

    def _call_base_layer(self, run, block_input: torch.Tensor, args: tuple, kwargs: dict):
        """Run the frozen block on the prompted sequence; methods that also act inside the block override it."""
        return self.base_layer(block_input, *args, **kwargs)

    def _extend_masks(self, run, block_input: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Open the prompt positions in the attention mask the tower built for its original sequence."""
        mask = block_attention_mask(self.base_layer, args, kwargs)
        if not isinstance(mask, torch.Tensor):
            return args, kwargs
        return with_block_attention_mask(self.base_layer, args, kwargs, self._extend_mask(run, block_input, mask))

    def _extend_mask(self, run, block_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only when the prompts are in this block's input: with the key/value-prefix path the block sees the
        original sequence and the attention extends its key mask itself."""
        if mask.shape[-1] + run.count == block_input.shape[1]:
            return extend_attention_mask(mask, run.at, run.count, causal=run.causal)
        return mask

    def __repr__(self) -> str:
        return f"{self._tuner.prefix.rstrip('_')}.{super().__repr__()}"
