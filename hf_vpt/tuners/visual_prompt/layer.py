from __future__ import annotations

import math

import torch
from torch import nn

from ...core.kv_prefix import PREFIX_KWARG, handed_over
from ...core.layer import PromptedBlock
from ...core.surgery import insert_tokens, remove_tokens, replace_tokens
from ...layouts import Tower
from .config import VisualPromptConfig


def init_prompts(rows: int, num_tokens: int, width: int, method: str, patch_area: int) -> torch.Tensor:
    prompts = torch.empty(rows, num_tokens, width, dtype=torch.float32)
    if method == "vpt_uniform":
        # Xavier-uniform computed as if the prompt were a patch-embedding kernel (fan_in = 3·patch_h·patch_w).
        bound = math.sqrt(6.0 / (3 * patch_area + width))
        return nn.init.uniform_(prompts, -bound, bound)
    if method == "normal":
        return nn.init.normal_(prompts, std=0.02)
    return nn.init.zeros_(prompts)


class VisualPromptBank(nn.Module):
    """One adapter's prompts: `embeddings[kind]` is `[rows, p, width]` (rows = 1 shallow, one per block deep)."""

    def __init__(self, config: VisualPromptConfig, towers: list[Tower]):
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.projection = nn.ModuleDict()
        self.dropout = nn.Dropout(config.prompt_dropout)
        for tower in towers:
            width = config.prompt_projection_dim or tower.hidden_size
            rows = config.prompt_rows(tower.num_layers)
            self.embeddings[tower.kind] = nn.Parameter(
                init_prompts(rows, config.num_prompt_tokens, width, config.prompt_init, tower.patch_area)
            )
            if config.prompt_projection_dim:
                projection = nn.Linear(width, tower.hidden_size)
                nn.init.kaiming_normal_(projection.weight, a=0, mode="fan_out")
                self.projection[tower.kind] = projection

    def num_rows(self, kind: str) -> int:
        return self.embeddings[kind].shape[0]

    def prompts(self, kind: str, row: int) -> torch.Tensor:
        """The `[p, d]` prompts of one block (before dropout)."""
        prompts = self.embeddings[kind][row]
        if kind in self.projection:
            prompts = self.projection[kind](prompts)
        return prompts


class VisualPromptBlock(PromptedBlock):
    """Inserts the prompts before block 0, replaces them before deep blocks, removes them after the last block.

    Blocks listed in the forward's `kv_prefix_blocks` (deep blocks whose prompt outputs nobody reads) leave the
    sequence alone and hand their prompts to the attention as a key/value prefix instead; see `core/kv_prefix.py`.
    """

    def _uses_kv_prefix(self, run) -> bool:
        return self.block_index in run.extras.get("kv_prefix_blocks", ())

    def enter(self, run, hidden_states: torch.Tensor) -> torch.Tensor:
        tuner, kind, index = self._tuner, self.tower.kind, self.block_index
        if self._uses_kv_prefix(run):
            return hidden_states
        if hidden_states.shape[1] != run.prompted_length:  # first block that carries the prompts in the sequence
            return insert_tokens(hidden_states, tuner._gather_prompts(run, kind, index, hidden_states.dtype), run.at)
        has_row = run.route.sample_mask(lambda name: tuner.banks[name].num_rows(kind) > index, hidden_states.device)
        if has_row is None:  # shallow, or past the last deep block: prompts flow on
            return hidden_states
        new = tuner._gather_prompts(run, kind, index, hidden_states.dtype)
        if run.route.sample_groups is not None and not bool(has_row.all()):
            old = hidden_states[:, run.at : run.at + run.count]
            new = torch.where(has_row[:, None, None], new, old)
        return replace_tokens(hidden_states, new, run.at)

    def _call_base_layer(self, run, block_input: torch.Tensor, args: tuple, kwargs: dict):
        if not self._uses_kv_prefix(run):
            return self.base_layer(block_input, *args, **kwargs)
        prefix = self._tuner._kv_prefix(run, self.tower, self.block_index, block_input.dtype)
        layout = self.tower.attention_layouts[self.block_index]
        if layout.passes_kwargs:  # travels with the block call, so gradient checkpointing replays it
            return self.base_layer(block_input, *args, **{**kwargs, PREFIX_KWARG: prefix})
        with handed_over(layout, prefix):
            return self.base_layer(block_input, *args, **kwargs)

    def leave(self, run, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        if not self.is_last_block or block_output.shape[1] != run.prompted_length:
            return block_output
        mean_readout = run.extras.get("mean_readout")
        pooled = block_output[:, 1:].mean(dim=1) if mean_readout is not None else None
        output = remove_tokens(block_output, run.at, run.count)
        if pooled is not None:
            cls_slot = torch.where(mean_readout[:, None], pooled, output[:, 0])
            output = torch.cat([cls_slot[:, None], output[:, 1:]], dim=1)
        return output
