"""The one place where hf_vpt extends PEFT's closed `PeftType` enum and registers its methods.

PEFT's `register_peft_method` only accepts names that already exist in `PeftType`, and PEFT has no plugin
discovery, so `import hf_vpt` adds the members and registers every method. Members are created with
name == value (upper case): PEFT looks mappings up with the raw string read from `adapter_config.json`.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method


def peft_type(method_name: str) -> PeftType:
    """The `PeftType` member of an hf_vpt method, e.g. `peft_type("visual_prompt")`."""
    return _extend_peft_type(method_name.upper())


def _extend_peft_type(member_name: str) -> PeftType:
    """Add `member_name` to `PeftType` (idempotent) and return the member."""
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    # Enum keeps three views of its members; all of them must know the new one.
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register one hf_vpt method with PEFT. Safe to call again (notebook re-imports)."""
    peft_type = _extend_peft_type(name.upper())
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    return peft_type
