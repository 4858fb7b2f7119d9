"""Many `add_adapter` / `set_adapter` / `delete_adapter` cycles on one model leave nothing behind (issue 7).

For every method, a model with its "default" adapter goes through 50 cycles: add an adapter, activate it, run it
(every cycle a forward, some cycles a mixed batch with `adapter_names=[...]` or a forward + backward in training
mode), switch back or not, delete it. Afterwards the model must have exactly the footprint it started with: the
same modules, parameters and buffers (names, shapes, dtypes), the same number of hooks of every kind on every
module, the same instance attributes on every module (no `forward` patches left), and containers of the same sizes
(per-block adapter dicts, the tuner's bookkeeping, `peft_config`); no forward state may be pending. The number of
live tensors, counted with `gc`, must not grow from cycle to cycle.
"""

from __future__ import annotations

import gc

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_vpt
from hf_vpt.testing_utils import MICRO_IMAGEGPT, MICRO_VIT, tiny_imagegpt, tiny_vit


CYCLES = 50
SOS = 16  # ImageGPT start-of-sequence token
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit(num_labels=3, **MICRO_VIT).eval()


def _imagegpt() -> nn.Module:
    torch.manual_seed(0)
    return tiny_imagegpt(codebook_size=SOS, **MICRO_IMAGEGPT).eval()


METHODS = {
    "vpt_shallow": (_vit, lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="shallow")),
    # deep prompts run as key/value prefixes, which patch the attention modules' `forward` while attached
    "vpt_deep": (
        _vit,
        lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep", modules_to_save=["classifier"]),
    ),
    "gated": (_vit, lambda: hf_vpt.GatedPromptConfig(num_prompt_tokens=3, gate_init=1.0)),
    "apt": (_vit, lambda: hf_vpt.ApproxPromptConfig(num_prompt_tokens=3, rank=2, modules_to_save=["classifier"])),
    "generative": (_imagegpt, lambda: hf_vpt.GenerativePromptConfig(num_prompt_tokens=3, num_classes=3)),
}


def _inputs(method: str) -> dict:
    generator = torch.Generator().manual_seed(5)
    if method == "generative":
        body = torch.randint(0, SOS, (2, 5), generator=generator)
        ids = torch.cat([torch.full((2, 1), SOS), body], dim=1)
        return {"input_ids": ids, "class_labels": torch.tensor([1, 2]), "labels": ids}
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 1])}


def _footprint(model: nn.Module) -> dict:
    modules = list(model.named_modules(remove_duplicate=False))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    containers = {}
    for name, module in modules:
        for attribute, value in vars(module).items():
            # `active_adapter` may be "a" or ["a"] for the same state; the active adapters are compared below
            if isinstance(value, (dict, list, set, tuple)) and attribute not in ("active_adapter", "_active_adapter"):
                containers[f"{name}:{attribute}"] = len(value)
    tuner = model.base_model
    return {
        "modules": [(name, type(module).__name__) for name, module in modules],
        "tensors": [(name, tuple(t.shape), t.dtype) for name, t in tensors],
        "hooks": {name: [len(getattr(module, d, {})) for d in HOOK_DICTS] for name, module in modules},
        "attributes": {name: sorted(vars(module)) for name, module in modules},
        "patched_forward": sorted(name for name, module in modules if "forward" in vars(module)),
        "containers": containers,
        "adapters": sorted(model.peft_config),
        "banks": sorted(tuner.banks),
        "active": list(tuner.active_adapters),
        "pending_forward": (
            dict(tuner._forward_states),
            tuner._batch_adapter_names,
            getattr(tuner, "_class_labels", None),
        ),
    }


@pytest.fixture(scope="module")
def frozen_gc():
    """Move every object that exists before these tests out of `gc`'s sight, so that collecting and counting see
    only what they create (a full scan of a process with transformers loaded takes about a second)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _run(method: str, model: nn.Module, inputs: dict, cycle: int, name: str) -> None:
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    if cycle % 7 == 3:  # training mode, forward + backward through the new adapter
        model.train()
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    elif cycle % 5 == 1:  # a mixed batch: one sample per adapter
        with torch.no_grad():
            model(**kwargs, adapter_names=["default", name])
    else:
        with torch.no_grad():
            model(**kwargs)


@pytest.mark.filterwarnings("ignore:Adapter cycle_.* was active which is now deleted")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_add_set_delete_cycles_leave_nothing_behind(method, frozen_gc):
    make_base, make_config = METHODS[method]
    model = get_peft_model(make_base(), make_config())
    model.eval()
    inputs = _inputs(method)
    _run(method, model, inputs, 0, "default")  # warm-up: lazily created caches exist from here on
    baseline = _footprint(model)
    live = {"start": _live_tensors()}

    for cycle in range(CYCLES):
        name = f"cycle_{cycle}"
        model.add_adapter(name, make_config())
        model.set_adapter(name)
        _run(method, model, inputs, cycle, name)
        if cycle % 2:  # delete the active adapter; PEFT falls back to the remaining one
            model.delete_adapter(name)
        else:
            model.set_adapter("default")
            model.delete_adapter(name)
        model.set_adapter("default")
        if cycle in (4, CYCLES - 1):
            live[cycle] = _live_tensors()

    after = _footprint(model)
    for key in baseline:
        assert after[key] == baseline[key], f"{key} differs after {CYCLES} add/set/delete cycles"
    assert live["start"] > 0, "the count must see the model's own tensors"
    assert live["start"] == live[4] == live[CYCLES - 1], f"live tensors grew across cycles: {live}"
    # and the remaining adapter still works
    with torch.no_grad():
        model(**{k: v for k, v in inputs.items() if k != "labels"})
