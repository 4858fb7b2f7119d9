from __future__ import annotations

import torch
from torch import nn

from ...core.tuner import TowerForward
from ...layouts import Tower
from ..visual_prompt.model import VisualPromptModel
from .config import GatedPromptConfig
from .layer import GatedPromptBank, GatedPromptBlock


class GatedPromptModel(VisualPromptModel):
    """Gated Prompt Tuning (GPT, https://arxiv.org/abs/2306.05067) on a frozen transformers vision model.

    Example:

        ```py
        >>> import hf_vpt
        >>> from peft import get_peft_model
        >>> from transformers import ViTMAEModel

        >>> base = ViTMAEModel.from_pretrained("facebook/vit-mae-base", mask_ratio=0.0)
        >>> config = hf_vpt.GatedPromptConfig(num_prompt_tokens=100, gate_init=5, readout="mean_model_norm")
        >>> model = get_peft_model(base, config)
        >>> # ... train ...
        >>> for row in hf_vpt.gate_values(model):
        ...     print(row["block"], row["gate"], row["temperature"])
        ```

    Adapter `name` keeps its prompts, gate logits and temperatures in `model.base_model.gated_prompt_bank[name]`, one
    tensor each per tower, so saved adapters do not depend on module names. Temperatures act through forward hooks on
    the blocks' query projections (`q / τ_l`); the hooks do nothing while adapters are disabled and are removed by
    `unload()`.

    τ stays in `[min_temperature, max_temperature]` as in the official code, which clamps it in place before every
    forward, in two ways that act on the real parameter and never edit it inside a forward (under FSDP or ZeRO-3 a
    forward sees a gathered copy): the forward uses `clamp(τ)` with the gradient passed through unchanged, and after
    every optimiser step the temperatures that optimiser updated are clamped in place.
    """

    prefix: str = "gated_prompt_"
    tuner_layer_cls = GatedPromptBlock
    supported_tower_kinds = ("vision",)  # the method is defined (and tested) for vision towers only

    def _create_bank(self, adapter_name: str, config: GatedPromptConfig, towers: list[Tower]) -> GatedPromptBank:
        if config.readout != "default":
            for tower in towers:
                if tower.num_special_tokens == 0:
                    raise ValueError(
                        f"`readout={config.readout!r}` writes the pooled feature into the CLS slot, but the "
                        f"{tower.spec.name} has no CLS token. Use readout='default'."
                    )
        return GatedPromptBank(config, towers)

    def _install_hooks(self) -> None:
        super()._install_hooks()
        for tower in self._towers:
            for block in tower.blocks:  # the GatedPromptBlock wrappers by now
                query = tower.query_projection(block.base_layer)
                self._hook_handles.append(query.register_forward_hook(block._scale_query_output))

    def _gate(self, run: TowerForward, kind: str, block: int) -> torch.Tensor:
        """`[B]` float32 gate values `sigmoid(γ_block)` of each sample's adapter."""
        banks = self.banks
        return torch.sigmoid(run.route.gather(lambda name: banks[name].gate_logit(kind, block)))

    def _query_scale(self, run: TowerForward, kind: str, block: int) -> torch.Tensor | None:
        """`[B, 1, 1]` float32 factors `1/τ_block` of each sample's adapter; None if no adapter learns τ."""
        banks = self.banks
        if not any(kind in banks[name].temperatures for name in run.route.adapters):
            return None
        temperatures = run.route.gather(lambda name: banks[name].temperature(kind, block))
        return temperatures.reciprocal().view(-1, 1, 1)

    # ----------------------------------------------------------------------------------------------------------
    # inspection
    # ----------------------------------------------------------------------------------------------------------
    def gate_values(self, adapter_name: str | None = None) -> list[dict]:
        """The gates and temperatures of one adapter (default: the active one), one dict per block and tower:

        - `"tower"`, `"block"`: where (blocks counted from 0);
        - `"gate"`: `g_l = sigmoid(γ_l)`, the share of block l's own prompt output in the prompts it hands on (None
          for the last block, which has no gate);
        - `"selection_ratio"`: the paper's `r_l`, block l's share among all blocks in the prompts that reach the last
          block, `g_l · Π_{k>l}(1 − g_k)` normalised over the gated blocks (None for the last block);
        - `"temperature"`: τ_l as the next forward uses it (clamped to the configured range; 1.0 when the adapter
          does not learn temperatures).
        """
        name = self._resolve_adapter_name(adapter_name)
        bank, config = self.banks[name], self.peft_config[name]
        rows = []
        for tower in self._towers:
            kind, num_layers = tower.kind, tower.num_layers
            gates = torch.sigmoid(bank.gate_logits[kind].detach().double()).tolist()
            if kind in bank.temperatures:
                temperatures = bank.temperatures[kind].detach().double()
                temperatures = temperatures.clamp(config.min_temperature, config.max_temperature).tolist()
            else:
                temperatures = [1.0] * num_layers
            ratios = _selection_ratios(gates)
            for block in range(num_layers):
                gated = block < num_layers - 1
                rows.append(
                    {
                        "tower": kind,
                        "block": block,
                        "gate": gates[block] if gated else None,
                        "selection_ratio": ratios[block] if gated else None,
                        "temperature": temperatures[block],
                    }
                )
        return rows

    def _resolve_adapter_name(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            active = list(self.active_adapters)
            if len(active) != 1:
                raise ValueError(f"{len(active)} adapters are active ({active}); pass `adapter_name`.")
            return active[0]
        if adapter_name not in self.banks:
            raise ValueError(f"Unknown adapter {adapter_name!r}; available: {sorted(self.banks)}.")
        return adapter_name


def _selection_ratios(gates: list[float]) -> list[float]:
    """`r_l = g̃_l / Σ_j g̃_j` with `g̃_l = g_l · Π_{k>l} (1 − g_k)` (the paper's selection ratio)."""
    weights, carried = [0.0] * len(gates), 1.0
    for block in reversed(range(len(gates))):
        weights[block] = gates[block] * carried
        carried *= 1.0 - gates[block]
    total = sum(weights)
    return [w / total if total > 0 else 0.0 for w in weights]


def gate_values(model: nn.Module, adapter_name: str | None = None) -> list[dict]:
    """Per-block gates and temperatures of a gated-prompt model: `hf_vpt.gate_values(peft_model)`.

    Accepts a `PeftModel` (or its `base_model`, the `GatedPromptModel`); see `GatedPromptModel.gate_values` for the
    returned rows.
    """
    tuner = model if isinstance(model, GatedPromptModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, GatedPromptModel):
        raise TypeError(
            f"`gate_values` expects a PeftModel created with `GatedPromptConfig`; got {type(model).__name__} "
            f"(whose base_model is {type(tuner).__name__})."
        )
    return tuner.gate_values(adapter_name)
