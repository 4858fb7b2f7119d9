"""Fields and checks shared by every hf_vpt config."""

from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass, field

from peft import PeftConfig

from .._compat import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .validation import Bool, OptionalStr, StrList, TowerShapes, apply_field_rules


TOWER_KINDS = ("vision", "text", "multimodal")
# `base_model.<method>_bank.<...>`: the path-free keys every hf_vpt adapter file uses for its parameters.
_BANK_KEY = re.compile(r"base_model\.([a-z_]+_prompt)_bank\.")


class AdapterLoadError(ValueError):
    """An adapter does not fit the model or its files are broken; raised before the model is changed."""


@dataclass
class PromptConfigBase(PeftConfig):
    """Fields every hf_vpt method has. Method configs subclass it and add their own hyper-parameters."""

    towers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Which towers to prompt: a list from ('vision', 'text', 'multimodal'). None prompts the vision "
            "tower of a model that has one (e.g. `CLIPModel`), otherwise every tower the method supports "
            "('multimodal' is a joint text+image encoder such as ViLT)."
        },
    )
    keep_prompts_in_outputs: bool = field(
        default=False,
        metadata={
            "help": "Return per-layer `hidden_states` and `attentions` with the prompt positions included (they sit "
            "right after the special tokens). By default the caller sees the original sequence length."
        },
    )
    tower_shapes: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Recorded when the adapter is created: {tower kind: [number of blocks, hidden size]}. Loading "
            "checks it against the model so an adapter never lands on a backbone of another shape."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained and saved next to the prompts, typically the new head: ['classifier']."},
    )
    backbone_eval: bool = field(
        default=True,
        metadata={
            "help": "Keep the frozen backbone in eval mode while the model trains (its dropout and drop-path off), "
            "as the official VPT and gated-prompt code do: `model.train()` then switches only hf_vpt's prompt "
            "modules and the `modules_to_save` heads to training mode. The default True reproduces the papers' "
            "setting and makes the prompted features a deterministic function of the input; False lets the whole "
            "model follow `train()` (a backbone whose config has dropout or drop-path is then stochastic)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Unused: hf_vpt finds the blocks by structure. Kept for PEFT compatibility."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Unused; kept for PEFT compatibility."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Unused; kept for PEFT compatibility."}
    )

    FIELD_RULES = {
        "towers": StrList(TOWER_KINDS),
        "keep_prompts_in_outputs": Bool(),
        "tower_shapes": TowerShapes(TOWER_KINDS),
        "modules_to_save": StrList(),
        "backbone_eval": Bool(),
        # PEFT's own fields, as read from an adapter_config.json
        "inference_mode": Bool(),
        "base_model_name_or_path": OptionalStr(),
        "revision": OptionalStr(),
    }

    def __post_init__(self):
        super().__post_init__()
        apply_field_rules(self)  # types and ranges of every field, before any check that uses them
        self._check_shared_values()
        if self.towers is not None:
            if isinstance(self.towers, str):
                self.towers = [self.towers]
            bad = [t for t in self.towers if t not in TOWER_KINDS]
            if bad or not self.towers:
                raise ValueError(f"`towers` must be a non-empty list drawn from {TOWER_KINDS}; got {self.towers}.")
        if self.target_modules is not None:
            raise ValueError(
                "hf_vpt finds the transformer blocks by structure; leave `target_modules` unset (it would tie the "
                "adapter to module names that change between transformers releases)."
            )
        for name in ("exclude_modules", "target_parameters"):  # PEFT would act on them for any method
            if getattr(self, name):
                raise ValueError(
                    f"hf_vpt adapters target no individual modules or parameters; leave `{name}` unset (got "
                    f"{getattr(self, name)!r}). An adapter_config.json that sets it was not written by hf_vpt."
                )

    def _check_shared_values(self) -> None:
        """Type checks of the values several methods share (`True`, `"0.1"` or NaN must not slip through)."""
        if not isinstance(self.keep_prompts_in_outputs, bool):
            raise ValueError(f"`keep_prompts_in_outputs` must be True or False; got {self.keep_prompts_in_outputs!r}.")
        tokens = getattr(self, "num_prompt_tokens", 1)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"`num_prompt_tokens` must be a positive integer; got {tokens!r}.")
        dropout = getattr(self, "prompt_dropout", 0.0)
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`prompt_dropout` must be in [0, 1); got {dropout!r}.")

    # ---- adapter files ----------------------------------------------------------------------------------------
    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        """{key without adapter name: shape} of the tensors this config's adapter file must contain."""
        raise NotImplementedError

    @property
    def bank_key_prefix(self) -> str:
        raise NotImplementedError

    def check_adapter_file(self, weights_path: str) -> None:
        """Check an `adapter_model.safetensors` against this config before anything is loaded into a model."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(weights_path, framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(
                f"'{weights_path}' is not a readable safetensors file ({exc}). It may be truncated or corrupted; "
                "save or download the adapter again."
            ) from exc
        expected = self.expected_bank_shapes()
        found = {k: v for k, v in shapes.items() if k.startswith(self.bank_key_prefix)}
        other_methods = sorted(
            {m.group(1) for k in shapes if (m := _BANK_KEY.match(k)) and not k.startswith(self.bank_key_prefix)}
        )
        if not found and other_methods:
            declared = getattr(self.peft_type, "value", self.peft_type)
            raise AdapterLoadError(
                f"'{weights_path}' holds the tensors of a {' / '.join(other_methods)} adapter, but its "
                f"adapter_config.json says peft_type {declared!r}. The config and the weights belong to different "
                "methods; restore the adapter_config.json that was saved with these weights, or save the adapter "
                "again."
            )
        not_float = sorted(f"{k}: {dtypes[k]}" for k in found if not dtypes[k].startswith(("F", "BF")))
        if not_float:
            raise AdapterLoadError(
                f"'{weights_path}' stores adapter tensors with a non-floating-point dtype ({not_float}); prompts are "
                "floating-point parameters and would be silently rounded. The file is corrupted or was written by "
                "another tool; save the adapter again."
            )
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        mismatched = [
            f"{k}: file {found[k]} vs config {expected[k]}" for k in expected if k in found and found[k] != expected[k]
        ]
        if missing or unexpected or mismatched:
            raise AdapterLoadError(
                f"'{weights_path}' does not match its adapter_config.json: missing tensors {missing}, unexpected "
                f"tensors {unexpected}, shape mismatches {mismatched}. The folder mixes files of different adapters; "
                "save the adapter again."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.check_adapter_file(_locate_weights(pretrained_model_name_or_path, subfolder, kwargs))
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if os.path.isfile(os.path.join(save_directory, WEIGHTS_NAME)) and not os.path.isfile(
            os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        ):
            os.remove(os.path.join(save_directory, WEIGHTS_NAME))
            raise AdapterLoadError(
                "hf_vpt adapters are written as safetensors only (pickle files can run code when loaded). Call "
                "`save_pretrained` without `safe_serialization=False`."
            )
        super().save_pretrained(save_directory, **kwargs)
        from ..hub import write_model_card

        write_model_card(save_directory, self)


def _locate_weights(name_or_path: str, subfolder: str | None, kwargs: dict) -> str:
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(folder):
        safetensors_path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(safetensors_path):
            return safetensors_path
        if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            raise AdapterLoadError(
                f"'{folder}' holds only a pickle file ({WEIGHTS_NAME}); hf_vpt loads safetensors only because pickle "
                "files can run code when loaded. If you trust the file, convert it: "
                "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')`."
            )
        raise AdapterLoadError(f"'{folder}' has no {SAFETENSORS_WEIGHTS_NAME}; save the adapter again.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "force_download") if k in kwargs}
    try:
        return hf_hub_download(name_or_path, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except EntryNotFoundError as exc:
        raise AdapterLoadError(
            f"The Hub repo '{name_or_path}' has no {SAFETENSORS_WEIGHTS_NAME}; hf_vpt loads safetensors only."
        ) from exc
