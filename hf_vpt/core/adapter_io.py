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

from .._compat import (
    AuxiliaryTrainingWrapper,
    wrap_peft_model_card_update,
    wrap_peft_model_loading,
    wrap_transformers_adapter_loading,
)
from ..hub import (
    KEEP_USER_MODEL_CARD,
    MODEL_CARD_FACTS,
    model_card_facts,
    read_card_data,
    write_model_card,
    written_by_hf_vpt,
    written_by_trainer,
)
from ..registry import find_method_spec
from .config import AdapterLoadError, _locate_weights
from .tuner import (
    LOAD_CREATES_ADAPTER,
    TUNERS_CREATED_BY_LOAD,
    PromptTunerModel,
    _roll_back_adapter,
    put_back_original_heads,
    restore_bare_base,
)


def _guarded_from_pretrained(original, cls, model, model_id, *args, **kwargs):
    had_peft_config = hasattr(model, "peft_config")
    created = []
    tokens = LOAD_CREATES_ADAPTER.set(True), TUNERS_CREATED_BY_LOAD.set(created)
    try:
        return original(cls, model, model_id, *args, **kwargs)
    except Exception:
        # Whatever failed (the weights, or PEFT's task-specific wrapper after the injection), the caller's model
        # must not stay wrapped, hooked and frozen around prompts nobody loaded.
        for tuner in created:
            restore_bare_base(tuner)
        if created and not had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
        raise
    finally:
        LOAD_CREATES_ADAPTER.reset(tokens[0])
        TUNERS_CREATED_BY_LOAD.reset(tokens[1])


def _guarded_load_adapter(original, peft_model, model_id, adapter_name, *args, **kwargs):
    tuner = peft_model.base_model
    if not isinstance(tuner, PromptTunerModel):
        return original(peft_model, model_id, adapter_name, *args, **kwargs)
    awaiting = getattr(tuner, "_adapters_awaiting_weights", set())
    created_here = adapter_name not in peft_model.peft_config or adapter_name in awaiting
    heads_before = _wrapped_heads(peft_model)
    try:
        _locate_weights(str(model_id), kwargs.get("subfolder"), kwargs)  # safetensors only, before anything is read
        return original(peft_model, model_id, adapter_name, *args, **kwargs)
    except Exception as error:
        if created_here and adapter_name in peft_model.peft_config:
            _roll_back_adapter(peft_model, adapter_name)
            put_back_original_heads(peft_model, keep=heads_before)  # the refused adapter's own head wrappers
        missing = error.args[0] if isinstance(error, KeyError) and error.args else None
        if isinstance(missing, str) and missing.startswith("base_model.model."):  # PEFT's lookup of a head's tensor
            raise AdapterLoadError(
                f"The file of adapter '{adapter_name}' lacks {missing!r}, a tensor of a head its config declares in "
                "`modules_to_save`. Nothing was loaded and the model is unchanged; the file and adapter_config.json "
                "come from different adapters: save or download the adapter again."
            ) from error
        raise
    finally:
        awaiting.discard(adapter_name)


def _wrapped_heads(peft_model) -> set:
    """Paths of the heads PEFT has wrapped to keep a trained copy per adapter (`modules_to_save`)."""
    return {name for name, module in peft_model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)}


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
    read_card_data(save_directory)  # corrupt card data, symlinked card files, unreadable metadata: named first
    readme = os.path.join(save_directory, "README.md")
    users_card = os.path.isfile(readme) and not written_by_hf_vpt(readme)
    token = KEEP_USER_MODEL_CARD.set(users_card)
    facts = MODEL_CARD_FACTS.set(model_card_facts(peft_model))  # the card describes the model, not only the config
    try:
        return original(peft_model, save_directory, *args, **kwargs)
    finally:
        MODEL_CARD_FACTS.reset(facts)
        KEEP_USER_MODEL_CARD.reset(token)


def _guarded_model_card_update(original, peft_model, output_dir):
    """PEFT's card update for every adapter but hf_vpt's. hf_vpt's card is complete as written (PEFT would add the
    base model's local path as Hub metadata); a card `transformers.Trainer` has just written over it is merged back
    into hf_vpt's card (its metrics, sections and tags kept), so a Trainer push keeps the import line and snippet."""
    if not isinstance(peft_model.base_model, PromptTunerModel):
        return original(peft_model, output_dir)
    readme = os.path.join(str(output_dir), "README.md")
    if os.path.isfile(readme) and written_by_hf_vpt(readme):
        return None
    if os.path.isfile(readme) and written_by_trainer(readme):
        facts = MODEL_CARD_FACTS.set(model_card_facts(peft_model))
        try:
            write_model_card(output_dir, peft_model.active_peft_config)
        finally:
            MODEL_CARD_FACTS.reset(facts)
        return None
    return original(peft_model, output_dir)


def _refuse_transformers_loading(model, peft_model_id, peft_type) -> None:
    """transformers' own adapter loading (`AutoModel*.from_pretrained(adapter_dir)`, `pipeline(model=adapter_dir)`)
    injects only PEFT's built-in methods; for an hf_vpt adapter say which call loads it, before PEFT's misleading
    "use `get_peft_model`"."""
    spec = find_method_spec(peft_type) if peft_type else None
    if spec is None or spec.peft_builtin:
        return
    base_class = type(model).__name__
    # transformers has just loaded the base model the adapter names, from here:
    base = getattr(model, "name_or_path", None) or "<base model named in its adapter_config.json>"
    raise AdapterLoadError(
        f"'{peft_model_id}' holds an hf_vpt {spec.title} adapter (peft_type {spec.peft_type}). transformers' "
        "`from_pretrained(adapter_dir)` and `pipeline(model=adapter_dir)` only load PEFT's built-in methods such as "
        "LoRA; load this one with PEFT on its base model:\n\n"
        "    import hf_vpt\n"
        "    from peft import PeftModel\n"
        f"    base = {base_class}.from_pretrained({str(base)!r})  # an adapter with a trained head also needs "
        "its labels: id2label=..., ignore_mismatched_sizes=True\n"
        f"    model = PeftModel.from_pretrained(base, {str(peft_model_id)!r})\n\n"
        "and give a pipeline the loaded model: `pipeline(task, model=model, image_processor=...)`. The adapter's "
        "README.md has the complete snippet for its task, labels included."
    )


def install() -> None:
    wrap_peft_model_loading(_guarded_load_adapter, _guarded_from_pretrained, _guarded_save_pretrained)
    wrap_peft_model_card_update(_guarded_model_card_update)
    wrap_transformers_adapter_loading(_refuse_transformers_loading)
