"""All-or-nothing, safetensors-only loading and saving of hf_vpt adapters through PEFT's entry points.

`PeftModel.from_pretrained(model, path)` first wraps the model with a fresh adapter, then calls `load_adapter`,
which reads the weights and copies them in. hf_vpt wraps both (for its own adapters only; PEFT's other methods run
PEFT's code unchanged):

- before anything is read, the adapter must have an `adapter_model.safetensors` (also when `config=` is given, which
  skips `PeftConfig.from_pretrained` and its check): no code path reads a pickle;
- the tensors are checked before any is copied (`PromptTunerModel._remap_adapter_state_dict_for_load`: keys, shapes,
  dtypes, finiteness, and that nothing points outside the adapter's own tensors and declared heads);
- if anything fails, an adapter created by this load is removed again (the base model is bare again after a failed
  `PeftModel.from_pretrained`), while an adapter that existed before, loaded again under its own name, keeps its
  weights: it was never written to.

`PeftModel.save_pretrained` is wrapped too: `safe_serialization=False` is refused before a file is written (a pickle
next to an older `adapter_model.safetensors` would leave the folder loading the old prompts), the model-card data
file is read before anything is written (a corrupt one is named), and a README.md that hf_vpt did not write is kept
(PEFT updates its metadata and keeps the user's text; hf_vpt's card replaces only its own).
"""

from __future__ import annotations

import os

from .._compat import wrap_peft_model_loading
from ..hub import KEEP_USER_MODEL_CARD, read_card_data, written_by_hf_vpt
from .config import AdapterLoadError, _locate_weights
from .tuner import LOAD_CREATES_ADAPTER, PromptTunerModel, _roll_back_adapter


def _guarded_from_pretrained(original, cls, model, model_id, *args, **kwargs):
    token = LOAD_CREATES_ADAPTER.set(True)
    try:
        return original(cls, model, model_id, *args, **kwargs)
    finally:
        LOAD_CREATES_ADAPTER.reset(token)


def _guarded_load_adapter(original, peft_model, model_id, adapter_name, *args, **kwargs):
    tuner = peft_model.base_model
    if not isinstance(tuner, PromptTunerModel):
        return original(peft_model, model_id, adapter_name, *args, **kwargs)
    awaiting = getattr(tuner, "_adapters_awaiting_weights", set())
    created_here = adapter_name not in peft_model.peft_config or adapter_name in awaiting
    try:
        _locate_weights(str(model_id), kwargs.get("subfolder"), kwargs)  # safetensors only, before anything is read
        return original(peft_model, model_id, adapter_name, *args, **kwargs)
    except Exception:
        if created_here and adapter_name in peft_model.peft_config:
            _roll_back_adapter(peft_model, adapter_name)
        raise
    finally:
        awaiting.discard(adapter_name)


def _guarded_save_pretrained(original, peft_model, save_directory, *args, **kwargs):
    if not isinstance(peft_model.base_model, PromptTunerModel):
        return original(peft_model, save_directory, *args, **kwargs)
    if kwargs.get("safe_serialization", True) is False or (args and args[0] is False):
        raise AdapterLoadError(
            "hf_vpt adapters are written as safetensors only (pickle files can run code when loaded, and a pickle "
            "next to an older adapter_model.safetensors would make the folder load the old prompts). Call "
            "`save_pretrained` without `safe_serialization=False`; nothing was written."
        )
    save_directory = str(save_directory)
    read_card_data(save_directory)  # a corrupt card-data file is named before anything is written
    readme = os.path.join(save_directory, "README.md")
    users_card = os.path.isfile(readme) and not written_by_hf_vpt(readme)
    token = KEEP_USER_MODEL_CARD.set(users_card)
    try:
        return original(peft_model, save_directory, *args, **kwargs)
    finally:
        KEEP_USER_MODEL_CARD.reset(token)


def install() -> None:
    wrap_peft_model_loading(_guarded_load_adapter, _guarded_from_pretrained, _guarded_save_pretrained)
