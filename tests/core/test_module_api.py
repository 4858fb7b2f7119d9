"""hf_vpt's modules keep `nn.Module`'s API: PEFT, accelerate, FSDP and DeepSpeed call `model.apply(fn)`,
`model.to(...)`, `named_parameters()` and friends on the whole model, hf_vpt's banks and wrappers included.

APT's bank once defined `apply(kind, row, ...)`, which shadowed `nn.Module.apply(fn)`: `peft_model.apply(fn)` raised
a TypeError and `deepspeed.initialize` failed on every APT model."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_vpt
from hf_vpt.testing_utils import build, tiny_imagegpt


# What a subclass is meant to override; anything else nn.Module defines must keep its meaning.
OVERRIDABLE = {"forward", "extra_repr", "train"}  # train: backbone_eval keeps the frozen backbone in eval mode
METHODS = {
    "vpt_deep": lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep"),
    "vpt_shallow": lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="shallow"),
    "gated": lambda: hf_vpt.GatedPromptConfig(num_prompt_tokens=3),
    "apt": lambda: hf_vpt.ApproxPromptConfig(num_prompt_tokens=3, rank=2),
    "generative": lambda: hf_vpt.GenerativePromptConfig(num_prompt_tokens=3, num_classes=4),
}


def _imagegpt() -> nn.Module:
    torch.manual_seed(0)
    return tiny_imagegpt(codebook_size=16, n_positions=16).eval()


def _peft_model(method: str):
    base = _imagegpt() if method == "generative" else build("vit")
    return get_peft_model(base, METHODS[method]())


def _hf_vpt_module_classes() -> list[type]:
    for info in pkgutil.walk_packages(hf_vpt.__path__, prefix="hf_vpt."):
        importlib.import_module(info.name)
    found, stack = set(), [nn.Module]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return sorted((c for c in found if c.__module__.startswith("hf_vpt")), key=lambda c: c.__qualname__)


def _shadowing(names, allowed=OVERRIDABLE) -> set[str]:
    return {n for n in names if not n.startswith("__") and n in dir(nn.Module) and n not in allowed}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_reaches_every_module(method):
    model = _peft_model(method)
    seen = []
    assert model.apply(seen.append) is model
    assert len(seen) == len(list(model.modules()))
    # the usual use: re-initialise or cast through apply without touching hf_vpt's own call paths
    model.apply(lambda m: m.float())


def test_no_hf_vpt_module_class_shadows_an_nn_module_attribute():
    classes = _hf_vpt_module_classes()
    names = {c.__name__ for c in classes}
    assert {"ApproxPromptBank", "VisualPromptBank", "GatedPromptBank", "PromptedBlock"} <= names
    offenders = {c.__qualname__: _shadowing(vars(c)) for c in classes}
    assert not {k: v for k, v in offenders.items() if v}, offenders


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_hf_vpt_module_instance_shadows_an_nn_module_attribute(method):
    """Instance attributes set in `__init__` (plain dicts, tuples of settings) must not hide a method either."""
    model = _peft_model(method)
    instance_state = set(vars(nn.Module()))  # `training`, `_parameters`, ...: nn.Module's own instance attributes
    checked = 0
    for module in model.modules():
        if type(module).__module__.startswith("hf_vpt"):
            checked += 1
            offenders = _shadowing(vars(module), OVERRIDABLE | instance_state)
            assert not offenders, (type(module).__qualname__, offenders)
    assert checked > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_reference_to_a_replaced_base_parameter_is_kept(method):
    """FSDP2's `fully_shard` replaces every base parameter by its shard; a reference kept by the tuner (it once
    kept them to restore `requires_grad` after a failed load) held a whole unsharded model per process."""
    import gc
    import weakref

    model = _peft_model(method)
    owners = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False) if not p.requires_grad]
    watched = [weakref.ref(getattr(m, n)) for m, n in owners]
    for module, name in owners:
        setattr(module, name, nn.Parameter(getattr(module, name).detach().clone(), requires_grad=False))
    gc.collect()
    alive = sum(ref() is not None for ref in watched)
    assert alive == 0, f"{alive} of {len(watched)} replaced base parameters are still referenced"
