from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..._compat import (
    cache_length,
    check_tower,
    imagegpt_call,
    imagegpt_causal_buffers,
    output_cache,
    set_causal_buffer,
    with_imagegpt_call,
)
from ...core.tuner import PromptTunerModel, TowerForward
from ...layouts import Tower
from .config import GENERATIVE_TOWER_KIND, GenerativePromptConfig
from .generator import class_label_tensor
from .layer import GenerativePromptBank, GenerativePromptBlock
from .layouts import IMAGEGPT, find_generative_towers


# Set on an ImageGPT key/value cache whose first positions hold prompts, so later steps do not insert them again.
CACHE_PROMPT_ATTRIBUTE = "_hf_vpt_num_prompt_tokens"


class GenerativePromptModel(PromptTunerModel):
    """Generative visual prompt tuning (https://arxiv.org/abs/2210.00990) on a frozen UVit2D or ImageGPT model.

    Example:

        ```py
        >>> import hf_vpt
        >>> from hf_vpt.sampling import autoregressive_sample
        >>> from peft import get_peft_model
        >>> from transformers import ImageGPTForCausalImageModeling

        >>> base = ImageGPTForCausalImageModeling.from_pretrained("openai/imagegpt-small")
        >>> config = hf_vpt.GenerativePromptConfig(num_prompt_tokens=32, num_classes=10)
        >>> model = get_peft_model(base, config)
        >>> seeded = torch.Generator().manual_seed(0)
        >>> loss = model(input_ids=ids, labels=ids, class_labels=labels).loss  # ids start with the SOS token
        >>> tokens = autoregressive_sample(model, class_labels=labels, top_k=40, generator=seeded)
        ```

    The generator of adapter `name` lives in `model.base_model.generative_prompt_bank[name]`; its state dict keys
    (`generators.generative.class_embeddings`, ...) do not depend on module names.

    `class_labels=` is taken off the keyword arguments by a forward pre-hook on the base model, so the frozen model
    never receives it, whether adapters are enabled, disabled or chosen per sample with `adapter_names=[...]`.
    """

    prefix: str = "generative_prompt_"
    tuner_layer_cls = GenerativePromptBlock
    supported_tower_kinds = (GENERATIVE_TOWER_KIND,)

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self._class_labels: torch.Tensor | None = None
        self._prompts_in_cache: dict[int, int] = {}
        self._inserted: dict[int, int] = {}
        self._original_causal_buffers: list[tuple[nn.Module, torch.Tensor]] = []

    # ----------------------------------------------------------------------------------------------------------
    # injection
    # ----------------------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        # The generative towers are not in `hf_vpt.layouts.SUPPORTED_ARCHITECTURES` (no encoder method may pick them
        # up), so they are found here; the core then uses the towers it already has.
        first_injection = not self._towers
        if first_injection:
            self._towers = find_generative_towers(model)
        try:
            if first_injection:
                for tower in self._towers:
                    check_tower(tower)
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            if first_injection:
                self._towers = []
                self._block_positions = {}
            raise
        if first_injection:
            self._install_hooks()
        self._fit_causal_buffers()

    def _create_bank(self, adapter_name: str, config: GenerativePromptConfig, towers: list[Tower]):
        return GenerativePromptBank(config, towers)

    def _install_hooks(self) -> None:
        super()._install_hooks()
        self._hook_handles.append(
            self.model.register_forward_pre_hook(self._take_class_labels, with_kwargs=True, prepend=True)
        )
        self._hook_handles.append(self.model.register_forward_hook(self._drop_class_labels, always_call=True))
        for ti, tower in enumerate(self._towers):
            if tower.spec is IMAGEGPT:
                start = partial(self._on_imagegpt_start, ti)
                self._hook_handles.append(tower.root.register_forward_pre_hook(start, with_kwargs=True))
                self._hook_handles.append(tower.root.register_forward_hook(partial(self._on_imagegpt_end, ti)))

    def _fit_causal_buffers(self) -> None:
        """Make every ImageGPT causal buffer large enough for `n_positions` image tokens plus the longest prompt."""
        longest = max(config.num_prompt_tokens for config in self.peft_config.values())
        for tower in self._towers:
            if tower.spec is not IMAGEGPT:
                continue
            needed = int(tower.config.n_positions) + longest
            for block in tower.blocks:
                for module, causal in imagegpt_causal_buffers(block):
                    if causal.shape[-1] >= needed:
                        continue
                    if not any(owner is module for owner, _ in self._original_causal_buffers):
                        self._original_causal_buffers.append((module, causal))
                    bigger = torch.tril(torch.ones(needed, needed, dtype=torch.bool, device=causal.device))
                    set_causal_buffer(module, bigger.view(1, 1, needed, needed))

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        while self._original_causal_buffers:
            module, original = self._original_causal_buffers.pop()
            set_causal_buffer(module, original)
        return model

    # ----------------------------------------------------------------------------------------------------------
    # class labels
    # ----------------------------------------------------------------------------------------------------------
    def _take_class_labels(self, module, args, kwargs):
        if "class_labels" not in kwargs:
            return None
        kwargs = dict(kwargs)
        labels = kwargs.pop("class_labels")
        if labels is not None:
            labels = class_label_tensor(labels)
        self._class_labels = labels
        return args, kwargs

    def _drop_class_labels(self, module, args, output):
        self._class_labels = None
        return output

    def _begin_extras(self, run: TowerForward, tower: Tower, hidden_states: torch.Tensor) -> None:
        tower_index = next(i for i, t in enumerate(self._towers) if t is tower)
        prompts_in_cache = self._prompts_in_cache.get(tower_index, 0)
        if prompts_in_cache:
            run.count = 0
            run.prompted_length = hidden_states.shape[1]
            run.extras["prompts_in_cache"] = True
            return
        labels = self._class_labels
        if labels is not None and labels.shape[:1] != (hidden_states.shape[0],):
            raise ValueError(
                f"`class_labels` has shape {tuple(labels.shape)} but the batch has {hidden_states.shape[0]} samples; "
                "pass one class label per sample."
            )
        for name in run.route.adapters:
            config = self.peft_config[name]
            if config.num_classes is not None and labels is None:
                raise ValueError(
                    f"Adapter '{name}' generates class-conditional prompts (num_classes={config.num_classes}); call "
                    "the model with one label per sample: `model(..., class_labels=labels)`."
                )
        run.extras["class_labels"] = labels

    def _begin_tower_forward(self, tower_index: int, hidden_states: torch.Tensor, active: list[str]) -> TowerForward:
        run = super()._begin_tower_forward(tower_index, hidden_states, active)
        self._inserted[tower_index] = run.count
        return run

    def _gather_prompts(self, run: TowerForward, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """`[B, p, d]` prompts of every sample (its adapter's generator applied to its label), in `dtype`."""
        labels = run.extras.get("class_labels")
        batch = run.route.batch_size

        def prompts_of(name: str) -> torch.Tensor:
            generator = self.banks[name].generators[kind]
            if generator.is_conditional:
                return generator(labels)
            return generator(batch_size=batch)

        if run.route.sample_groups is None:
            return prompts_of(run.route.adapters[0]).to(dtype)
        per_adapter = torch.stack([prompts_of(name) for name in run.route.adapters])  # [A, B, p, d]
        rows = torch.arange(batch, device=per_adapter.device)
        return per_adapter[run.route.sample_groups.to(per_adapter.device), rows].to(dtype)

    # ----------------------------------------------------------------------------------------------------------
    # ImageGPT: positions, the key/value cache and the position limit
    # ----------------------------------------------------------------------------------------------------------
    def _prompting(self, tower: Tower) -> bool:
        block = tower.blocks[0]
        return not block.disable_adapters and bool(block.active_adapters)

    def _on_imagegpt_start(self, tower_index: int, module, args, kwargs):
        tower = self._towers[tower_index]
        self._prompts_in_cache[tower_index] = 0
        self._inserted[tower_index] = 0
        if not self._prompting(tower):
            return None
        # Arguments are found by the forward's signature: transformers 5.24 renamed the cache `past_key_values` ->
        # `cache`, and a caller may still pass either spelling.
        call = imagegpt_call(module, args, kwargs)
        reference = call.tokens
        if reference is None:
            return None
        length = reference.shape[1] if reference.dim() > 1 else reference.shape[0]
        past = cache_length(call.cache)
        in_cache = getattr(call.cache, CACHE_PROMPT_ATTRIBUTE, 0) if past else 0
        if past and not in_cache:
            raise ValueError(
                "The key/value cache holds positions computed without prompts, but a generative prompt adapter is "
                "active. Start the cache with the adapter active (or disable the adapter for the whole generation)."
            )
        image_past = past - in_cache
        limit = int(tower.config.n_positions)
        position_ids = call.position_ids
        last = int(position_ids.max()) + 1 if position_ids is not None else image_past + length
        if last > limit:
            raise ValueError(
                f"ImageGPT has {limit} positions (`n_positions`), but this call needs positions up to {last - 1} "
                f"({image_past} cached image tokens + {length} new ones). The image sequence, SOS included, must fit "
                f"in {limit} tokens; the prompts do not count against this limit."
            )
        self._prompts_in_cache[tower_index] = in_cache
        if not in_cache:
            return None
        if position_ids is None:
            position_ids = torch.arange(image_past, image_past + length, device=reference.device).unsqueeze(0)
        else:
            position_ids = None  # the caller's positions stay
        mask = call.mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == image_past + length:
            ones = torch.ones(mask.shape[0], in_cache, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
        else:
            mask = None  # nothing to open
        return with_imagegpt_call(module, args, kwargs, position_ids=position_ids, attention_mask=mask)

    def _on_imagegpt_end(self, tower_index: int, module, args, output):
        count = self._inserted.pop(tower_index, 0)
        self._prompts_in_cache.pop(tower_index, None)
        if not count:
            return output
        cache = output_cache(output)
        if cache is not None:
            setattr(cache, CACHE_PROMPT_ATTRIBUTE, count)
        return output
