from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._compat import config_attention_dropout
from ...core.layer import PromptedBlock
from ...layouts import Tower
from .config import ApproxPromptConfig


def approx_prompt_output(
    attention_input: torch.Tensor,
    attention_output: torch.Tensor,
    prompts: torch.Tensor,
    key_down: torch.Tensor,
    key_up: torch.Tensor,
    scale: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """APT on one attention sub-layer: `exp(s) · (Y + stopgrad(max_j a) ⊙ a·P)` with `a = ReLU(X̂ · K̃ᵀ)`.

    Shapes: `attention_input` X̂ and `attention_output` Y `[B, N, d]`, `prompts` P `[p, d]`, `key_down` `[r, d]`,
    `key_up` `[d, r]`, `scale` a 0-d tensor. The key map is input-independent (computed once per call, not per
    sample); single head over the full width, no `1/sqrt(d)`, no mask, as in the released code.
    """
    keys = prompts + (prompts @ key_down.t()) @ key_up.t()  # [p, d] = P (I + W_downᵀ W_upᵀ)
    scores = F.dropout(F.relu(attention_input @ keys.t()), p=dropout, training=training)  # [B, N, p]
    weight = scores.detach().amax(dim=-1, keepdim=True)  # [B, N, 1], stands in for the prompts' softmax share
    return scale.exp() * (attention_output + weight * (scores @ prompts))


class ApproxPromptBank(nn.Module):
    """One adapter's APT parameters, path-free: per tower kind `prompts [R, p, d]`, `key_down [R, r, d]`,
    `key_up [R, d, r]` and `scale [R]`, one row per adapted attention sub-layer (blocks in increasing order)."""

    def __init__(self, config: ApproxPromptConfig, towers: list[Tower]):
        super().__init__()
        self.prompts = nn.ParameterDict()
        self.key_down = nn.ParameterDict()
        self.key_up = nn.ParameterDict()
        self.scale = nn.ParameterDict()
        self.rows: dict[str, dict[int, int]] = {}  # kind -> {block index: row}; plain attribute, not state
        self.dropout: dict[str, float] = {}
        p, r = config.num_prompt_tokens, config.rank
        for tower in towers:
            blocks = config.adapted_layers(tower.num_layers)
            count, d = len(blocks), tower.hidden_size
            self.rows[tower.kind] = {block: row for row, block in enumerate(blocks)}
            self.dropout[tower.kind] = config_attention_dropout(tower.config)
            self.prompts[tower.kind] = nn.Parameter(nn.init.normal_(torch.empty(count, p, d), std=0.02))
            self.key_down[tower.kind] = nn.Parameter(nn.init.normal_(torch.empty(count, r, d), std=1.0))
            self.key_up[tower.kind] = nn.Parameter(torch.zeros(count, d, r))
            self.scale[tower.kind] = nn.Parameter(torch.zeros(count))

    def row(self, kind: str, block_index: int) -> int | None:
        return self.rows.get(kind, {}).get(block_index)

    def adapt(
        self, kind: str, row: int, attention_input: torch.Tensor, attention_output: torch.Tensor, training: bool
    ) -> torch.Tensor:
        """APT's output for row `row` of tower `kind`. Not called `apply`: that is `nn.Module.apply(fn)`, which
        PEFT, accelerate and DeepSpeed call on the whole model."""
        dtype = attention_output.dtype
        return approx_prompt_output(
            attention_input.to(dtype),
            attention_output,
            self.prompts[kind][row].to(dtype),
            self.key_down[kind][row].to(dtype),
            self.key_up[kind][row].to(dtype),
            self.scale[kind][row].to(dtype),
            dropout=self.dropout[kind],
            training=training,
        )


class ApproxPromptLayer(PromptedBlock):
    """Wraps the attention sub-layer of one block (not the block: APT inserts no tokens, so no mask or sequence
    surgery is needed). The wrapped module's first input is X̂ and its first output is Y."""

    def forward(self, *args: Any, **kwargs: Any):
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(*args, **kwargs)
        attention_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        output = self.base_layer(*args, **kwargs)
        attention_output = output[0] if isinstance(output, tuple) else output
        adapted = self._tuner._add_approx_prompts(self, attention_input, attention_output)
        if isinstance(output, tuple):
            return (adapted, *output[1:])
        return adapted
