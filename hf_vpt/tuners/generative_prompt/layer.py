from __future__ import annotations

import torch
from torch import nn

from ...core.layer import PromptedBlock
from ...core.surgery import insert_tokens, remove_tokens
from ...layouts import Tower
from .config import GenerativePromptConfig
from .generator import PromptGenerator
from .layouts import IMAGEGPT


class GenerativePromptBank(nn.Module):
    """One adapter's parameters: `generators[kind]` is the `PromptGenerator` of the (single) generative tower."""

    def __init__(self, config: GenerativePromptConfig, towers: list[Tower]):
        super().__init__()
        self.generators = nn.ModuleDict()
        for tower in towers:
            self.generators[tower.kind] = PromptGenerator(
                num_tokens=config.num_prompt_tokens,
                hidden_size=tower.hidden_size,
                num_classes=config.num_classes,
                width=config.generator_width,
                mlp_hidden_size=config.mlp_hidden_size,
                dropout=config.prompt_dropout,
                init_std=config.init_std,
            )


def open_prompt_positions(mask: torch.Tensor | None, count: int, queries_too: bool) -> torch.Tensor | None:
    """Prepend `count` always-visible key positions to a 4-D mask `[B, h, Q, K]` (and `count` query rows if asked).

    Used for ImageGPT, whose causality comes from its own `bias` buffer: the mask it passes to the blocks only
    carries key padding, and prompts are never padding.
    """
    if mask is None or count == 0:
        return mask
    if mask.dim() != 4:
        raise ValueError(f"Expected a 4-D attention mask in the ImageGPT blocks; got {mask.dim()} dimensions.")
    visible = True if mask.dtype == torch.bool else 0.0
    columns = torch.full((*mask.shape[:-1], count), visible, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([columns, mask], dim=-1)
    if queries_too and mask.shape[-2] > 1:
        rows = torch.full((*mask.shape[:-2], count, mask.shape[-1]), visible, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([rows, mask], dim=-2)
    return mask


class GenerativePromptBlock(PromptedBlock):
    """Inserts the generated prompts before block 0 and removes them after the last block.

    With ImageGPT and a key/value cache that already holds the prompts (autoregressive sampling after the first
    step) the forward's `count` is 0: nothing is inserted or removed.
    """

    def enter(self, run, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.block_index != 0 or run.count == 0:
            return hidden_states
        prompts = self._tuner._gather_prompts(run, self.tower.kind, hidden_states.dtype)
        return insert_tokens(hidden_states, prompts, run.at)

    def leave(self, run, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        if not self.is_last_block or run.count == 0:
            return block_output
        return remove_tokens(block_output, run.at, run.count)

    def _extend_mask(self, run, block_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.tower.spec is not IMAGEGPT:
            return super()._extend_mask(run, block_input, mask)
        # ImageGPT's mask carries key padding only (causality is its `bias` buffer); with the prompts already in
        # the cache only their key columns are opened.
        fresh = not run.extras.get("prompts_in_cache", False)
        return open_prompt_positions(mask, run.count, fresh)
