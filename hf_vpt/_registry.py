"""The one place where hf_vpt extends PEFT's closed `PeftType` enum and registers its methods.

PEFT's `register_peft_method` only accepts names that already exist in `PeftType`, and PEFT has no plugin
discovery, so `import hf_vpt` adds the members and registers every method. Members are created with
name == value (upper case): PEFT looks mappings up with the raw string read from `adapter_config.json`.
Methods do not call this module themselves: their folder's one `hf_vpt.registry.register(MethodSpec(...))` line
does, and records everything else hf_vpt knows about the method.
"""

from __future__ import annotations

from ._compat import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType, add_peft_type_member, register_peft_method


def peft_type(method_name: str) -> PeftType:
    """The `PeftType` member of an hf_vpt method, e.g. `peft_type("visual_prompt")`."""
    return add_peft_type_member(method_name.upper())


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register one hf_vpt method with PEFT. Safe to call again (notebook re-imports)."""
    peft_type = add_peft_type_member(name.upper())
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    return peft_type
