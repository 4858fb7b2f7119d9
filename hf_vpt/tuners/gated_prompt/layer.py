from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn

from ..._compat import (
    block_checkpoint_function,
    block_uses_gradient_checkpointing,
    register_optimizer_step_post_hook,
    set_block_gradient_checkpointing,
)
from ...core.surgery import replace_tokens
from ...layouts import Tower
from ..visual_prompt.layer import VisualPromptBank, VisualPromptBlock
from .config import GatedPromptConfig


class ClampedTemperature(torch.autograd.Function):
    """`τ.clamp(low, high)` forward, identity backward: what the official code computes by clamping τ's storage
    (`.data.clamp_`) before the forward, so the forward sees the clamped value and the whole gradient reaches τ,
    even at a bound. Here the clamp acts on the value the forward uses, so it is right wherever the parameter lives
    (a gathered FSDP / ZeRO copy included), and it needs no in-place edit inside the forward."""

    @staticmethod
    def forward(ctx, temperature: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return temperature.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


# Banks that learn temperatures; after every optimiser step, the temperatures that optimiser updated are clamped.
_BANKS_WITH_TEMPERATURES: weakref.WeakSet = weakref.WeakSet()
_STEP_HOOK = None


def _clamp_stepped_temperatures(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Keep the stored τ in range, as the official code does, on the tensors the optimiser itself updates: a plain
    parameter, a DDP replica, an FSDP2 shard (DTensor) or an FSDP1 `use_orig_params` view of the local shard. Between
    two steps nothing else changes τ, so this equals the official clamp before the next forward."""
    if not _BANKS_WITH_TEMPERATURES:
        return
    stepped = {id(param) for group in optimizer.param_groups for param in group["params"]}
    with torch.no_grad():
        for bank in list(_BANKS_WITH_TEMPERATURES):
            low, high = bank.temperature_range
            for temperature in bank.temperatures.values():
                if id(temperature) in stepped:
                    temperature.clamp_(low, high)


class GatedPromptBank(VisualPromptBank):
    """One adapter's parameters, all float32 and path-free, per tower kind:

    - `embeddings[kind]`: the `[1, p, width]` shallow prompts (and `projection[kind]` if configured), as in VPT;
    - `gate_logits[kind]`: `[L - 1]` gate logits γ, one per block but the last, initialised to `−gate_init`;
    - `temperatures[kind]`: `[L]` attention temperatures τ initialised to 1 (absent if `learn_temperature=False`).
    """

    def __init__(self, config: GatedPromptConfig, towers: list[Tower]):
        super().__init__(config, towers)
        self.gate_logits = nn.ParameterDict()
        self.temperatures = nn.ParameterDict()
        for tower in towers:
            num_gates = max(tower.num_layers - 1, 0)
            self.gate_logits[tower.kind] = nn.Parameter(torch.full((num_gates,), -config.gate_init))
            if config.learn_temperature:
                self.temperatures[tower.kind] = nn.Parameter(torch.ones(tower.num_layers))
        self.temperature_range = (config.min_temperature, config.max_temperature)  # plain attribute, not state
        if self.temperatures:
            _watch_temperatures(self)

    def gate_logit(self, kind: str, block: int) -> torch.Tensor:
        return self.gate_logits[kind][block]

    def temperature(self, kind: str, block: int) -> torch.Tensor:
        """τ of one block, clamped to the configured range (gradient as if unclamped, as in the official code); a
        constant 1 when the adapter does not learn temperatures."""
        if kind in self.temperatures:
            low, high = self.temperature_range
            return ClampedTemperature.apply(self.temperatures[kind][block], low, high)
        logits = self.gate_logits[kind]
        return torch.ones((), device=logits.device, dtype=logits.dtype)


def _watch_temperatures(bank: GatedPromptBank) -> None:
    global _STEP_HOOK
    _BANKS_WITH_TEMPERATURES.add(bank)
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_clamp_stepped_temperatures)


class GatedPromptBlock(VisualPromptBlock):
    """VPT-shallow insertion before block 0, temperature-scaled queries inside every block, gated prompt mixing
    after blocks 0..L-2, and prompt removal (plus the optional mean readout) after the last block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # `[B, 1, 1]` factor 1/τ for the query projection while this block runs prompted; None otherwise, so the
        # query hook is a no-op when adapters are disabled or the block is called on its own.
        self._active_query_scale: torch.Tensor | None = None

    def enter(self, run, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.block_index == 0:
            return super().enter(run, hidden_states)
        return hidden_states  # shallow prompts flow on from block to block

    def leave(self, run, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        if self.is_last_block:
            return super().leave(run, block_input, block_output)
        gate = self._tuner._gate(run, self.tower.kind, self.block_index).view(-1, 1, 1)
        start, stop = run.at, run.at + run.count
        # The gate's gradient needs `new`, saved for backward: a copy of the prompt rows, not a view that would keep
        # the whole [B, N+p, d] block output alive (the block input stays alive anyway, for LayerNorm's backward).
        new, old = block_output[:, start:stop].clone(), block_input[:, start:stop]
        mixed = gate * new.float() + (1 - gate) * old.float()
        return replace_tokens(block_output, mixed.to(block_output.dtype), run.at)

    def _call_base_layer(self, run, block_input: torch.Tensor, args: tuple, kwargs: dict):
        scale = self._tuner._query_scale(run, self.tower.kind, self.block_index)
        if scale is None:
            return self.base_layer(block_input, *args, **kwargs)
        base = self.base_layer
        if block_uses_gradient_checkpointing(base) and base.training and torch.is_grad_enabled():
            # transformers would recompute the block in backward without this block's 1/τ; checkpoint the block
            # here instead, with the scale as an input, so the recomputation scales the queries the same way.
            checkpoint = block_checkpoint_function(base)
            return checkpoint(partial(self._scaled_call, **kwargs), scale, block_input, *args)
        return self._scaled_call(scale, block_input, *args, **kwargs)

    def _scaled_call(self, scale: torch.Tensor, block_input: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        inner_checkpointing = block_uses_gradient_checkpointing(base)
        self._active_query_scale = scale
        try:
            if inner_checkpointing:
                set_block_gradient_checkpointing(base, False)
            return base(block_input, *args, **kwargs)
        finally:
            self._active_query_scale = None
            if inner_checkpointing:
                set_block_gradient_checkpointing(base, True)

    def _scale_query_output(self, module: nn.Module, args, output: torch.Tensor):
        """Forward hook on the block's query projection: `q / τ` gives `softmax(q·kᵀ / (sqrt(d_head)·τ))` exactly."""
        if self._active_query_scale is None:
            return None
        return output * self._active_query_scale.to(output.dtype)
