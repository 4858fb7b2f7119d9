from __future__ import annotations

from functools import partial

import torch

from ..._compat import block_uses_gradient_checkpointing
from ...core.kv_prefix import KVPrefix, project_prefix
from ...core.layer import PromptedBlock
from ...core.tuner import PromptTunerModel, TowerForward
from ...layouts import WINDOWED, Tower
from . import swin
from .config import VisualPromptConfig
from .layer import VisualPromptBank, VisualPromptBlock


class VisualPromptModel(PromptTunerModel):
    """Visual Prompt Tuning (VPT, https://arxiv.org/abs/2203.12119) on a frozen transformers vision model.

    Example:

        ```py
        >>> import hf_vpt
        >>> from peft import get_peft_model
        >>> from transformers import ViTForImageClassification

        >>> base = ViTForImageClassification.from_pretrained("google/vit-base-patch16-224-in21k", num_labels=100)
        >>> config = hf_vpt.VisualPromptConfig(num_prompt_tokens=50, depth="deep", modules_to_save=["classifier"])
        >>> model = get_peft_model(base, config)
        >>> model.print_trainable_parameters()
        ```

    The prompts of adapter `name` live in `model.base_model.visual_prompt_bank[name]`, one `[rows, p, d]` tensor per
    tower, so saved adapters do not depend on module names.
    """

    prefix: str = "visual_prompt_"
    tuner_layer_cls = VisualPromptBlock
    # `towers=None` still means "the vision tower if the model has one" (see `select_towers`): `CLIPModel` gets
    # vision prompts only, `CLIPTextModel` text prompts (after BOS) and ViLT prompts after its text [CLS].
    # ... and Swin's windowed vision tower (`swin.py`: prompts attached to every window)
    supported_tower_kinds = ("vision", "text", "multimodal", WINDOWED)

    def _create_bank(self, adapter_name: str, config: VisualPromptConfig, towers: list[Tower]) -> VisualPromptBank:
        if any(tower.spec.windowed for tower in towers):
            swin.check_swin_config(config, towers)
            return swin.SwinPromptBank(config, towers)
        if config.readout != "default":
            for tower in towers:
                if tower.kind != "vision":
                    raise ValueError(
                        f"`readout={config.readout!r}` is a vision-tower readout (MAE); the {tower.spec.name} keeps "
                        "its own readout. Use readout='default' or `towers=['vision']`."
                    )
                if tower.num_special_tokens == 0:
                    raise ValueError(
                        f"`readout={config.readout!r}` writes the pooled feature into the CLS slot, but the "
                        f"{tower.spec.name} has no CLS token. Use readout='default'."
                    )
        return VisualPromptBank(config, towers)

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        tower_index, block_index = self._block_positions[current_key]
        if isinstance(target, PromptedBlock) or not self._towers[tower_index].spec.windowed:
            return super()._create_and_replace(
                peft_config, adapter_name, target, target_name, parent, current_key, parameter_name
            )
        wrapper = swin.SwinPromptedLayer(target, adapter_name, self, tower_index, block_index)
        self._replace_module(parent, target_name, wrapper, target)

    def _install_hooks(self) -> None:
        super()._install_hooks()
        for index, tower in enumerate(self._towers):
            if not tower.spec.windowed:
                continue
            for stage in tower.stages:
                if stage.merging is not None:
                    hook = partial(swin.on_patch_merging, self, index)
                    self._hook_handles.append(stage.merging.register_forward_hook(hook))
            if tower.pooler is not None:
                self._hook_handles.append(tower.pooler.register_forward_hook(partial(swin.on_pooler, self, index)))

    def _begin_extras(self, run: TowerForward, tower: Tower, hidden_states: torch.Tensor) -> None:
        if tower.spec.windowed:
            swin.begin_swin_forward(run)
            return
        device = hidden_states.device
        readout = {name: self.peft_config[name].readout for name in run.route.adapters}
        run.extras["mean_readout"] = run.route.sample_mask(lambda n: readout[n] != "default", device)
        run.extras["unit_norm_readout"] = run.route.sample_mask(lambda n: readout[n] == "mean_unit_norm", device)
        run.extras["kv_prefix_blocks"] = self._kv_prefix_blocks(run, tower)

    def _kv_prefix_blocks(self, run: TowerForward, tower: Tower) -> frozenset[int]:
        """The blocks whose prompt outputs nobody reads, so their prompts can be a key/value prefix."""
        configs = [self.peft_config[name] for name in run.route.adapters]
        exact = tower.supports_kv_prefix and all(
            c.kv_prefix and c.depth == "deep" and c.readout == "default" and not c.keep_prompts_in_outputs
            for c in configs
        )
        rows = {self.banks[name].num_rows(tower.kind) for name in run.route.adapters}
        if not exact or len(rows) != 1 or self._checkpoint_replay_would_lose_prefix(tower):
            return frozenset()
        (rows,) = rows
        # block i's prompt outputs are replaced by block i+1's prompts while i + 1 < rows; with prompts in every
        # block, the last block's prompt outputs are dropped after it
        blocks = set(range(rows - 1))
        if rows == tower.num_layers:
            blocks.add(tower.num_layers - 1)
        return frozenset(blocks)

    @staticmethod
    def _checkpoint_replay_would_lose_prefix(tower: Tower) -> bool:
        """Gradient checkpointing replays a block in backward; a prefix handed over on the module (BERT-style
        attentions, whose blocks drop keyword arguments) would be gone by then, so those blocks concatenate."""
        if all(layout.passes_kwargs for layout in tower.attention_layouts):
            return False
        return torch.is_grad_enabled() and any(
            block_uses_gradient_checkpointing(block.get_base_layer()) and block.training for block in tower.blocks
        )

    def _kv_prefix(self, run: TowerForward, tower: Tower, block: int, dtype: torch.dtype) -> KVPrefix:
        """The key/value prefix of block `block`'s prompts: shared by the batch, or per sample (mixed adapters,
        dropout). The block's attention projects it (`core/kv_prefix.py`)."""
        bank = self.banks[run.route.adapters[0]]
        dropout_active = any(
            self.banks[name].dropout.training and self.banks[name].dropout.p > 0 for name in run.route.adapters
        )
        if run.route.sample_groups is None and not dropout_active:
            prompts = bank.prompts(tower.kind, block)[None].to(dtype)
        else:
            prompts = self._gather_prompts(run, tower.kind, block, dtype)
        return project_prefix(tower.attention_layouts[block], prompts, run.at)

    def _gather_prompts(self, run: TowerForward, kind: str, row: int, dtype: torch.dtype) -> torch.Tensor:
        """`[B, p, d]` prompts of block `row` for every sample, cast to the activations' dtype, with dropout."""
        banks = self.banks

        def prompts_of(name: str) -> torch.Tensor:
            bank = banks[name]
            return bank.prompts(kind, min(row, bank.num_rows(kind) - 1))

        prompts = run.route.gather(prompts_of).to(dtype)
        return run.route.apply_per_adapter(prompts, lambda name, x: banks[name].dropout(x))
