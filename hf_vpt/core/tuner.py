"""The PEFT tuner shared by hf_vpt's prompt methods.

It finds the towers of a model (see `hf_vpt.layouts`), wraps their blocks in `PromptedBlock`s, keeps one *bank* of
prompt parameters per adapter on the tuner itself (path-free state dict keys such as
`base_model.visual_prompt_bank.embeddings.vision`), routes adapters to samples, removes the prompt positions from
what the caller sees, and checks adapters before they touch the model. A method subclasses it, defines its bank and
block wrapper, and nothing else.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import (
    AuxiliaryTrainingWrapper,
    BaseTuner,
    block_uses_gradient_checkpointing,
    check_tower,
    tuner_state_dict_key_prefixes,
)
from ..layouts import Tower, select_towers
from .config import AdapterLoadError
from .kv_prefix import disable_prefix_attention, enable_prefix_attention
from .layer import PromptedBlock
from .routing import BatchRoute
from .surgery import strip_recorded_outputs


# True while `PeftModel.from_pretrained` builds its PeftModel: the adapter injected then is created by the load
# (`hf_vpt.core.loading` sets it, and removes such an adapter again if its weights do not load).
LOAD_CREATES_ADAPTER: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_vpt_load_creates", default=False)
# The tuners `PeftModel.from_pretrained` creates (a list while one runs): a load that fails after wrapping the
# model (e.g. in PEFT's task-specific `PeftModel` subclass) unwraps the caller's base model through them.
TUNERS_CREATED_BY_LOAD: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "hf_vpt_tuners_created_by_load", default=None
)

MERGE_ERROR = (
    "Prompt tuning adds tokens to the sequence; it has no weight delta that could be merged into the base model. "
    "Keep the PeftModel for inference, or call `unload()` to get the untouched base model back."
)


@dataclass
class TowerForward:
    """The state of one tower during one forward, created by its first block and dropped by the tower's end hook."""

    route: BatchRoute
    at: int  # first prompt position
    count: int  # number of prompt tokens in the sequence
    prompted_length: int  # sequence length while the prompts are inside
    extras: dict = field(default_factory=dict)  # method-specific state (e.g. readout masks)
    causal: bool = False  # the tower attends causally (CLIP text): prompts are ordinary causal positions


class PromptTunerModel(BaseTuner):
    """Base class of the hf_vpt tuners. Subclasses set `prefix`, `tuner_layer_cls` and implement `_create_bank`."""

    tuner_layer_cls = PromptedBlock
    target_module_mapping: dict = {}
    uses_shared_state = True
    supported_tower_kinds: tuple[str, ...] = ("vision",)

    # ----------------------------------------------------------------------------------------------------------
    # what a method provides
    # ----------------------------------------------------------------------------------------------------------
    def _create_bank(self, adapter_name: str, config, towers: list[Tower]) -> nn.Module:
        """The trainable parameters of one adapter, in float32."""
        raise NotImplementedError

    def _num_tokens(self, adapter_name: str, tower: Tower) -> int:
        return self.peft_config[adapter_name].num_prompt_tokens

    def _begin_extras(self, run: TowerForward, tower: Tower, hidden_states: torch.Tensor) -> None:
        """Fill `run.extras` at the start of a tower's forward (readout masks, ...)."""

    # ----------------------------------------------------------------------------------------------------------
    # injection
    # ----------------------------------------------------------------------------------------------------------
    @property
    def banks(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "bank")

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        created = TUNERS_CREATED_BY_LOAD.get()
        if created is not None:
            created.append(self)
        setattr(self, self.prefix + "bank", nn.ModuleDict())
        # PEFT freezes the base model while injecting; a load that is rolled back gives the flags back.
        # By name, not by object: a reference to each Parameter would keep the full, unsharded weights alive after
        # FSDP2's `fully_shard` replaces them with shards (a whole extra model per process).
        self._base_requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
        self._towers: list[Tower] = []
        self._block_positions: dict[str, tuple[int, int]] = {}
        self._hook_handles: list = []
        self._forward_states: dict[int, TowerForward] = {}
        self._batch_adapter_names: list[str] | None = None
        # adapters injected by `PeftModel.from_pretrained` whose weights are still to be loaded (core/loading.py)
        self._adapters_awaiting_weights: set[str] = set()

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        config = self.peft_config[adapter_name]
        if not self._towers:
            towers = select_towers(model, config.towers, self.supported_tower_kinds)
        else:  # later adapters prompt the towers the first one found (blocks are wrapped by then)
            towers = self._towers
            requested = set(config.towers) if config.towers is not None else {t.kind for t in towers}
            if requested != {t.kind for t in towers}:
                raise ValueError(
                    f"Adapter '{adapter_name}' asks for towers {sorted(requested)}, but the adapters of this model "
                    f"prompt {sorted(t.kind for t in towers)}. All adapters of one model must prompt the same towers."
                )
        self._check_fits(adapter_name, config, towers)
        self._check_modules_to_save(adapter_name, config, model, towers)
        first_injection = not self._towers
        if first_injection:  # every upstream internal the towers' prompting relies on, before anything is wrapped
            for tower in towers:
                check_tower(tower)
        # A refused adapter (e.g. APT `layers` past the depth, found by `_create_bank`) must leave the adapters that
        # are already there exactly as they were.
        previous_towers, previous_positions = self._towers, self._block_positions
        # PEFT's `inject_adapter` re-applies `set_adapter(..., inference_mode=<the new adapter's>)` and then restores
        # the trainability of the parameters it finds in the base model; the banks live on the tuner, so hf_vpt
        # restores theirs: adding (or failing to add) an adapter never freezes or unfreezes the others.
        earlier_flags = [(p, p.requires_grad) for bank in self.banks.values() for p in bank.parameters()]
        self._towers = towers
        self._block_positions = {
            name: (ti, bi) for ti, tower in enumerate(towers) for bi, name in enumerate(tower.block_names)
        }
        try:
            config.tower_shapes = {t.kind: [t.num_layers, t.hidden_size] for t in towers}
            _check_bank_size(adapter_name, config, model)
            device = next(towers[0].blocks.parameters()).device
            bank = self._create_bank(adapter_name, config, towers)
            # `PeftModel.from_pretrained(..., low_cpu_mem_usage=True)` builds the tuner under accelerate's
            # `init_empty_weights`: the bank is then on the meta device until the adapter file is assigned into it.
            if not any(p.is_meta for p in bank.parameters()):
                bank = bank.to(device=device)
            self.banks[adapter_name] = bank
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=False
            )
        except Exception:
            if adapter_name in self.banks:
                del self.banks[adapter_name]
            self._towers, self._block_positions = previous_towers, previous_positions
            raise
        finally:
            for param, requires_grad in earlier_flags:
                param.requires_grad_(requires_grad)
        if first_injection:
            self._install_hooks()
        if LOAD_CREATES_ADAPTER.get():
            self._adapters_awaiting_weights.add(adapter_name)
        # only the new adapter's bank: as PEFT's `add_adapter`, adding one leaves the others' trainability alone
        self.banks[adapter_name].requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
        if self.model.training:  # a model built in training mode gets the backbone mode its adapter asks for
            self.train(True)

    @staticmethod
    def _check_modules_to_save(adapter_name: str, config, model: nn.Module, towers: list[Tower]) -> None:
        """Refuse `modules_to_save` entries that reach into a prompted tower (its embeddings, blocks or norms).

        An adapter file may carry a trained copy of every module its config names there, so a name such as "vit"
        or "layer" would let a file replace the frozen backbone's weights. Matched the way PEFT matches them (any
        module whose path ends with the entry).
        """
        entries = [entry for entry in (getattr(config, "modules_to_save", None) or []) if entry]
        if not entries:
            return
        # The blocks always; the rest of a tower root too, unless the root is the whole model (UVit2D), whose
        # output and conditioning layers outside the blocks are what such a model trains as heads.
        tower_params = {
            id(param)
            for tower in towers
            for param in (tower.blocks if tower.root is model else tower.root).parameters()
        }
        reaching = sorted(
            {
                entry
                for name, module in model.named_modules(remove_duplicate=False)
                for entry in entries
                if name.endswith(entry) and any(id(param) in tower_params for param in module.parameters())
            }
        )
        if reaching:
            raise AdapterLoadError(
                f"Adapter '{adapter_name}': `modules_to_save` entries {reaching} name modules that hold weights of the "
                f"prompted tower(s) {[tower.name or tower.kind for tower in towers]}; an adapter may save only heads "
                "outside the frozen backbone (e.g. 'classifier'), never the backbone itself. Name the head module "
                "only (train the whole backbone with full fine-tuning instead). Nothing was changed."
            )

    def _check_fits(self, adapter_name: str, config, towers: list[Tower]) -> None:
        """Reject an adapter recorded for other towers (hidden size, depth) before anything is changed."""
        recorded = config.tower_shapes or {}
        for tower in towers:
            if tower.kind in recorded and list(recorded[tower.kind]) != [tower.num_layers, tower.hidden_size]:
                layers, width = recorded[tower.kind]
                raise AdapterLoadError(
                    f"Adapter '{adapter_name}' was trained for a {tower.kind} tower with {layers} blocks of hidden size "
                    f"{width}, but this model's {tower.spec.name} has {tower.num_layers} blocks of hidden size "
                    f"{tower.hidden_size}. Load it onto the base model it was trained on "
                    f"(`base_model_name_or_path={config.base_model_name_or_path!r}`)."
                )

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # targets are found by structure, not from `target_modules`

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._block_positions

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        if isinstance(target, PromptedBlock):
            target.update_layer(adapter_name)
            return
        tower_index, block_index = self._block_positions[current_key]
        wrapper = self.tuner_layer_cls(target, adapter_name, self, tower_index, block_index)
        self._replace_module(parent, target_name, wrapper, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Blocks are not Linear-like (PEFT's default copies `.weight`), and the wrapper has no parameters to move.
        setattr(parent, child_name, new_module)

    def _install_hooks(self) -> None:
        for ti, tower in enumerate(self._towers):
            self._hook_handles.append(tower.root.register_forward_pre_hook(partial(self._on_tower_start, ti)))
            # always_call: a forward that fails inside the tower must not leave its state (masks, labels) behind
            end = tower.root.register_forward_hook(partial(self._on_tower_end, ti), always_call=True)
            self._hook_handles.append(end)
            if tower.final_norm is not None:
                self._hook_handles.append(tower.final_norm.register_forward_hook(partial(self._on_final_norm, ti)))
            if tower.supports_kv_prefix:
                for layout in tower.attention_layouts:
                    enable_prefix_attention(layout, tower.spec)

    def _remove_hooks(self) -> None:
        while self._hook_handles:
            self._hook_handles.pop().remove()
        for tower in self._towers:
            for layout in tower.attention_layouts:
                if layout is not None:
                    disable_prefix_attention(layout)

    # ----------------------------------------------------------------------------------------------------------
    # adapter bookkeeping
    # ----------------------------------------------------------------------------------------------------------
    def _sync_bank_trainability(self, inference_mode: bool = False) -> None:
        for name, bank in self.banks.items():
            bank.requires_grad_(name in self.active_adapters and not inference_mode)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_bank_trainability(inference_mode=inference_mode)

    def train(self, mode: bool = True):
        """`nn.Module.train`, except that with `backbone_eval` (the default) the frozen backbone stays in eval mode:
        only the prompt banks (on the tuner) and the trained heads (`modules_to_save`) follow `mode`."""
        super().train(mode)
        if mode and self._backbone_eval():
            self.model.train(False)
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):  # a head in `modules_to_save` trains
                    module.train(True)
                elif block_uses_gradient_checkpointing(module):
                    # transformers checkpoints only `if self.gradient_checkpointing and self.training`: the layer
                    # itself (not its dropouts) keeps training mode, or gradient_checkpointing_enable() would do
                    # nothing under backbone_eval.
                    module.training = True
        return self

    def _backbone_eval(self) -> bool:
        # Several active adapters (per-sample routing) share one backbone: any of them asking keeps it in eval mode.
        configs = [self.peft_config[name] for name in self.active_adapters if name in self.peft_config]
        return any(getattr(config, "backbone_eval", False) for config in configs)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if name in self.banks:
                self.banks[name].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        if enabled:
            self._sync_bank_trainability()
        else:
            self.banks.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.banks[adapter_name]

    def _check_merge_allowed(self):
        raise ValueError(MERGE_ERROR)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(MERGE_ERROR)
        self._remove_hooks()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        for name in list(self.banks):
            del self.banks[name]
        self._towers = []
        self._block_positions = {}
        return model

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Banks are created in float32 and cast to the activations' dtype in forward. With
        # `autocast_adapter_dtype=False` PEFT's contract is that adapters keep the base model's dtype instead.
        if autocast_adapter_dtype or adapter_name not in self.banks:
            return
        base_dtype = next(self._towers[0].blocks.parameters()).dtype
        if base_dtype.is_floating_point:
            self.banks[adapter_name].to(dtype=base_dtype)

    # ----------------------------------------------------------------------------------------------------------
    # forward
    # ----------------------------------------------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            self._check_materialized(self.active_adapters)
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("`adapter_names` must be a list of adapter names, one per sample.")
        if len(adapter_names) == 0:
            raise ValueError(
                "`adapter_names` is empty: a forward needs at least one sample, and one adapter name per sample."
            )
        unknown = sorted({n for n in adapter_names if n not in self.peft_config})
        if unknown:
            hint = " Samples without prompts are not supported in a mixed batch yet." if "__base__" in unknown else ""
            raise ValueError(
                f"`adapter_names` contains unknown adapters {unknown}; available: {sorted(self.peft_config)}.{hint}"
            )
        self._check_materialized(list(dict.fromkeys(adapter_names)))
        self._batch_adapter_names = list(adapter_names)
        # Trained heads (`modules_to_save`) must follow each sample's adapter too, as PEFT's LoRA routes them.
        head_hooks = [
            module.register_forward_pre_hook(
                partial(_pass_adapter_names, adapter_names=self._batch_adapter_names), with_kwargs=True
            )
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        try:
            yield
        finally:
            self._batch_adapter_names = None
            for hook in head_hooks:
                hook.remove()

    def _check_materialized(self, adapter_names) -> None:
        """Refuse a forward with prompts that only exist on the meta device (weights never loaded)."""
        for name in adapter_names:
            bank = self.banks[name] if name in self.banks else None
            if bank is not None and any(p.is_meta for p in bank.parameters()):
                raise ValueError(
                    f"The prompts of adapter '{name}' are on the meta device: the adapter was created with "
                    "`low_cpu_mem_usage=True` (or under `init_empty_weights`) and its weights were never loaded. Load "
                    f"them first (`model.load_adapter(path, adapter_name={name!r})` or `set_peft_model_state_dict`), "
                    "or create the adapter without `low_cpu_mem_usage`."
                )

    def _begin_tower_forward(self, tower_index: int, hidden_states: torch.Tensor, active: list[str]) -> TowerForward:
        tower = self._towers[tower_index]
        batch = hidden_states.shape[0]
        if self._batch_adapter_names is not None:
            route = BatchRoute.per_sample(self._batch_adapter_names, batch, hidden_states.device)
        else:
            if len(active) != 1:
                raise ValueError(
                    f"{len(active)} prompt adapters are active ({active}); prompt adapters cannot be stacked. Activate "
                    "one with `set_adapter(name)`, or give each sample its own with `adapter_names=[...]`."
                )
            route = BatchRoute.single(active[0], batch)
        counts = {name: self._num_tokens(name, tower) for name in route.adapters}
        if len(set(counts.values())) != 1:
            raise ValueError(
                f"A batch can only mix adapters with the same number of prompt tokens; got {counts}. Split the batch "
                "by prompt length."
            )
        count = next(iter(counts.values()))
        run = TowerForward(
            route, tower.num_special_tokens, count, hidden_states.shape[1] + count, causal=tower.spec.causal
        )
        self._begin_extras(run, tower, hidden_states)
        self._forward_states[tower_index] = run
        return run

    def _tower_forward_state(self, tower_index: int) -> TowerForward | None:
        return self._forward_states.get(tower_index)

    def _on_tower_start(self, tower_index: int, module, args):
        self._forward_states.pop(tower_index, None)

    def _on_tower_end(self, tower_index: int, module, args, output):
        run = self._forward_states.pop(tower_index, None)
        if run is None or output is None or self._keeps_prompts_in_outputs(run):  # output None: the forward failed
            return output
        return strip_recorded_outputs(output, run.at, run.count, run.prompted_length)

    def _keeps_prompts_in_outputs(self, run: TowerForward) -> bool:
        return any(getattr(self.peft_config[name], "keep_prompts_in_outputs", False) for name in run.route.adapters)

    def _on_final_norm(self, tower_index: int, module, args, output):
        """Readouts that replace the pretrained final norm by a parameter-free one at the CLS slot."""
        run = self._forward_states.get(tower_index)
        mask = None if run is None else run.extras.get("unit_norm_readout")
        if mask is None:
            return output
        normed_input = args[0]
        cls_in = normed_input[:, 0] if normed_input.dim() == 3 else normed_input
        cls_out = F.layer_norm(cls_in, cls_in.shape[-1:], eps=module.eps)
        if output.dim() == 3:
            slot = torch.where(mask[:, None], cls_out, output[:, 0])
            return torch.cat([slot[:, None], output[:, 1:]], dim=1)
        return torch.where(mask[:, None], cls_out, output)

    # ----------------------------------------------------------------------------------------------------------
    # loading
    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # bank keys carry the adapter name in the middle: `<prefix>bank.<adapter>.embeddings.vision`
        marker = f"{cls.prefix}bank.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.prefix}bank.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check an adapter's tensors before a single one is copied into the model.

        An hf_vpt adapter file may hold its own prompt tensors and the heads its config declares in
        `modules_to_save`, nothing else: a key that points at a base-model parameter (the CLS token, a block weight,
        an undeclared head) is refused, as are missing tensors, other shapes, non-float prompts and non-finite
        values. PEFT itself only warns about missing keys and loads any key that matches the model. A failed load
        is undone by `hf_vpt.core.loading` (an adapter this load created is removed; an existing one was never
        written to).
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        prefixes = tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        bank_prefix = f"base_model.{cls.prefix}bank.{adapter_name}."
        head_marker = f".modules_to_save.{adapter_name}."
        outside = sorted(k for k in remapped if not k.startswith(bank_prefix) and head_marker not in k)
        if outside:
            declared = list(getattr(config, "modules_to_save", None) or [])
            raise AdapterLoadError(
                f"The file of adapter '{adapter_name}' holds tensors outside the adapter: {outside}. An hf_vpt adapter "
                f"may only hold its own prompt tensors and the heads its config declares in `modules_to_save` (here "
                f"{declared}); these keys would overwrite the frozen base model. Nothing was loaded and the model is "
                "unchanged. Do not use this file unless you know where it comes from."
            )
        expected = {k for k in model_state if k.startswith(bank_prefix) and any(k.startswith(p) for p in prefixes)}
        missing = sorted(expected - set(remapped))
        unexpected = sorted(k for k in remapped if k not in model_state)
        mismatched = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
            for k, v in remapped.items()
            if k in model_state and tuple(v.shape) != tuple(model_state[k].shape)
        ]
        if missing or unexpected or mismatched:
            raise AdapterLoadError(
                f"The weights of adapter '{adapter_name}' do not fit this model: missing tensors {missing}, "
                f"unexpected tensors {unexpected}, shape mismatches {mismatched}. Nothing was loaded and the model is "
                "unchanged; check that the adapter folder belongs to this base model and method."
            )
        # `load_state_dict` would copy integer or boolean tensors into the float prompts and heads without a word.
        not_float = sorted(
            f"{k}: {v.dtype}"
            for k, v in remapped.items()
            if model_state[k].dtype.is_floating_point and not v.dtype.is_floating_point
        )
        if not_float:
            raise AdapterLoadError(
                f"The weights of adapter '{adapter_name}' have a non-floating-point dtype ({not_float}); prompts and "
                "heads are floating-point parameters. Nothing was loaded and the model is unchanged; the file is "
                "corrupted or was written by another tool, save the adapter again."
            )
        # In the model's dtype, as they will be used: a float64 1e300 (or a float32 1e5 for a float16 bank) is
        # finite in the file and infinite in the model. Also keeps the model's dtype under `low_cpu_mem_usage`,
        # where the file's tensors are assigned, not copied.
        remapped = {
            k: v.to(model_state[k].dtype)
            if v.dtype.is_floating_point and model_state[k].dtype.is_floating_point
            else v
            for k, v in remapped.items()
        }
        not_finite = sorted(
            k for k, v in remapped.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())
        )
        if not_finite:
            raise AdapterLoadError(
                f"The weights of adapter '{adapter_name}' contain NaN or infinite values ({not_finite}); every output "
                "would be NaN. Nothing was loaded and the model is unchanged; the file is corrupted, save or download "
                "the adapter again."
            )
        return remapped


# Prompts are a small fraction of the model they adapt; the floor leaves room on tiny test models.
MIN_BANK_ELEMENT_LIMIT = 2**24


def _check_bank_size(adapter_name: str, config, model: nn.Module) -> None:
    """Refuse, before allocating it, a bank with more elements than the model it adapts (at least
    `MIN_BANK_ELEMENT_LIMIT`): each config field has its own bound, but a stranger's adapter_config.json can combine
    them (4096 prompt tokens projected from width 65536) into gigabytes."""
    elements = sum(math.prod(shape) for shape in config.expected_bank_shapes().values())
    limit = max(MIN_BANK_ELEMENT_LIMIT, sum(param.numel() for param in model.parameters()))
    if elements > limit:
        raise AdapterLoadError(
            f"Adapter '{adapter_name}' would hold {elements:,} prompt parameters, more than the limit of {limit:,} "
            f"(the parameters of the model it adapts, at least {MIN_BANK_ELEMENT_LIMIT:,}); its config combines "
            "sizes (num_prompt_tokens, projection or generator widths, num_classes) no prompt adapter needs. Choose "
            "smaller values; an adapter_config.json with them was not written for this model. Nothing was allocated "
            "or changed."
        )


def _pass_adapter_names(module, args, kwargs, adapter_names):
    return args, {**kwargs, "adapter_names": adapter_names}


def _roll_back_adapter(peft_model, adapter_name: str) -> None:
    """Undo the injection of an adapter whose weights turned out not to fit."""
    tuner = peft_model.base_model
    if len(tuner.peft_config) > 1:
        peft_model.delete_adapter(adapter_name)
    else:
        restore_bare_base(tuner)


def put_back_original_heads(model: nn.Module, keep: frozenset | set = frozenset()) -> None:
    """Replace each head PEFT wrapped for `modules_to_save` (`ModulesToSaveWrapper`) by the very module it wrapped,
    except the wrappers named in `keep` (module paths in `model`)."""
    for name, module in list(model.named_modules()):
        if name not in keep and isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "original_module"):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.original_module)


def restore_bare_base(tuner) -> None:
    """Give the base model back as it was before `tuner` wrapped it: blocks unwrapped, heads put back as the very
    modules they were (PEFT's `unload` would put in the adapter's trained copy), hooks removed, trainability flags
    restored (safe to call twice)."""
    put_back_original_heads(tuner.model)
    tuner.unload()
    for name, param in tuner.model.named_parameters():
        if name in tuner._base_requires_grad:
            param.requires_grad_(tuner._base_requires_grad[name])
