from __future__ import annotations

import torch
from torch import nn

from ...core.routing import BatchRoute
from ...core.tuner import PromptTunerModel
from ...layouts import Tower
from .config import ApproxPromptConfig
from .layer import ApproxPromptBank, ApproxPromptLayer


APT_MERGE_ERROR = (
    "APT adds a non-linear term (ReLU scores over learned prompts) to each attention output; it has no weight delta "
    "that could be merged into the base model. Keep the PeftModel for inference, or call `unload()` to get the "
    "untouched base model back."
)


class ApproxPromptModel(PromptTunerModel):
    """Approximated Prompt Tuning (APT, https://arxiv.org/abs/2306.15706) on a frozen transformers model.

    Example:

        ```py
        >>> import hf_vpt
        >>> from peft import get_peft_model
        >>> from transformers import ViltForQuestionAnswering

        >>> base = ViltForQuestionAnswering.from_pretrained("dandelin/vilt-b32-mlm", num_labels=3129)
        >>> config = hf_vpt.ApproxPromptConfig(num_prompt_tokens=200, rank=4, modules_to_save=["classifier"])
        >>> model = get_peft_model(base, config)
        >>> model.print_trainable_parameters()
        ```

    The PEFT targets are the attention sub-layers of the prompted towers' blocks (found by structure: the child of
    a block that holds its query projection), not the blocks: APT inserts no tokens, so no mask, position or
    output surgery happens. The parameters of adapter `name` live in `model.base_model.approx_prompt_bank[name]`,
    one tensor per tower and role (`[R, p, d]`, `[R, r, d]`, `[R, d, r]`, `[R]`), so saved adapters do not depend
    on module names.
    """

    prefix: str = "approx_prompt_"
    tuner_layer_cls = ApproxPromptLayer
    supported_tower_kinds = ("vision", "text", "multimodal")

    def _create_bank(self, adapter_name: str, config: ApproxPromptConfig, towers: list[Tower]) -> ApproxPromptBank:
        if "cross" in config.attentions:
            raise ValueError(
                f"`attentions={config.attentions}` asks for cross-attention, but "
                f"{', '.join(t.spec.name for t in towers)} has self-attention only. Use attentions=['self']."
            )
        for tower in towers:
            if config.layers is not None and max(config.layers) >= tower.num_layers:
                raise ValueError(
                    f"`layers={config.layers}` names blocks that the {tower.spec.name} does not have (it has "
                    f"{tower.num_layers} blocks, indices 0..{tower.num_layers - 1})."
                )
        # PEFT targets: the attention sub-layers of this adapter's blocks (the base class put the blocks here).
        self._block_positions = {
            name: position
            for name, position in self._attention_positions(towers).items()
            if position[1] in config.adapted_layers(towers[position[0]].num_layers)
        }
        return ApproxPromptBank(config, towers)

    @staticmethod
    def _attention_positions(towers: list[Tower]) -> dict[str, tuple[int, int]]:
        positions = {}
        for ti, tower in enumerate(towers):
            for bi, (block_name, block) in enumerate(zip(tower.block_names, tower.blocks)):
                query = tower.query_projection(block)
                children = [n for n, child in block.named_children() if any(m is query for m in child.modules())]
                if len(children) != 1 or children[0] == "base_layer":
                    raise ValueError(
                        f"Could not find the attention sub-layer of {type(block).__name__} in the {tower.spec.name}."
                    )
                positions[f"{block_name}.{children[0]}"] = (ti, bi)
        return positions

    def _install_hooks(self) -> None:
        pass  # no tokens are inserted, so there is nothing to strip at the end of a tower

    def _check_merge_allowed(self):
        raise ValueError(APT_MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(APT_MERGE_ERROR)
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------
    def _route(self, layer: ApproxPromptLayer, batch: int, device: torch.device) -> BatchRoute:
        if self._batch_adapter_names is not None:
            return BatchRoute.per_sample(self._batch_adapter_names, batch, device)
        active = layer.active_adapters
        if len(active) != 1:
            raise ValueError(
                f"{len(active)} APT adapters are active ({active}); they cannot be stacked. Activate one with "
                "`set_adapter(name)`, or give each sample its own with `adapter_names=[...]`."
            )
        return BatchRoute.single(active[0], batch)

    def _apply_one(self, name: str, layer: ApproxPromptLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bank = self.banks[name]
        row = bank.row(layer.tower.kind, layer.block_index) if name in layer.prompted_adapters else None
        if row is None:  # this adapter does not adapt this block
            return y
        return bank.adapt(layer.tower.kind, row, x, y, training=layer.training)

    def _add_approx_prompts(self, layer: ApproxPromptLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        route = self._route(layer, y.shape[0], y.device)
        if route.sample_groups is None:
            return self._apply_one(route.adapters[0], layer, x, y)
        result = y
        for group, name in enumerate(route.adapters):
            index = (route.sample_groups == group).nonzero().squeeze(1)
            result = result.index_copy(0, index, self._apply_one(name, layer, x[index], y[index]))
        return result


def count_parameters(bank: nn.Module) -> int:
    """Number of APT parameters in one bank (`p·d + 2·r·d + 1` per adapted sub-layer)."""
    return sum(p.numel() for p in bank.parameters())
