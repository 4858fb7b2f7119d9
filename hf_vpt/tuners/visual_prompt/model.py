from __future__ import annotations

import torch

from ...core.tuner import PromptTunerModel, TowerForward
from ...layouts import Tower
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

    def _create_bank(self, adapter_name: str, config: VisualPromptConfig, towers: list[Tower]) -> VisualPromptBank:
        if config.readout != "default":
            for tower in towers:
                if tower.num_special_tokens == 0:
                    raise ValueError(
                        f"`readout={config.readout!r}` writes the pooled feature into the CLS slot, but the "
                        f"{tower.spec.name} has no CLS token. Use readout='default'."
                    )
        return VisualPromptBank(config, towers)

    def _begin_extras(self, run: TowerForward, tower: Tower, hidden_states: torch.Tensor) -> None:
        device = hidden_states.device
        readout = {name: self.peft_config[name].readout for name in run.route.adapters}
        run.extras["mean_readout"] = run.route.sample_mask(lambda n: readout[n] != "default", device)
        run.extras["unit_norm_readout"] = run.route.sample_mask(lambda n: readout[n] == "mean_unit_norm", device)

    def _gather_prompts(self, run: TowerForward, kind: str, row: int, dtype: torch.dtype) -> torch.Tensor:
        """`[B, p, d]` prompts of block `row` for every sample, cast to the activations' dtype, with dropout."""
        banks = self.banks

        def prompts_of(name: str) -> torch.Tensor:
            bank = banks[name]
            return bank.prompts(kind, min(row, bank.num_rows(kind) - 1))

        prompts = run.route.gather(prompts_of).to(dtype)
        return run.route.apply_per_adapter(prompts, lambda name, x: banks[name].dropout(x))
