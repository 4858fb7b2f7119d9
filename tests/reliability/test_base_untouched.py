"""Training, disabling, deleting and unloading prompt adapters never changes a single byte of the base model
(issue 7), for every method.

Every tensor of the base model (parameters and buffers, non-persistent ones included) is hashed (sha256 of its
bytes, with dtype and shape) before the adapter is attached. After each stage (attach two adapters, train a few
steps with an optimizer over *all* parameters and weight decay, run with `disable_adapter`, `delete_adapter`,
`unload`) the same tensor objects must hash the same, and so must the tensors found under the base model's own
state-dict names. After `unload` the model must hold exactly the original tensor objects under the original names,
compute exactly what it computed before, and carry no hooks, patched `forward`s or `peft_config`. (The one
exception is PEFT's own: `unload` swaps in the active adapter's copy of a `modules_to_save` head.)
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_vpt
from hf_vpt.testing_utils import MICRO_IMAGEGPT, MICRO_VIT, tiny_imagegpt, tiny_vit


SOS = 16  # ImageGPT start-of-sequence token
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return tiny_vit(num_labels=3, hidden_dropout_prob=0.1, **MICRO_VIT).eval()


def _imagegpt() -> nn.Module:
    torch.manual_seed(0)
    return tiny_imagegpt(codebook_size=SOS, **MICRO_IMAGEGPT).eval()


METHODS = {
    "vpt_shallow": (
        _vit,
        lambda: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="shallow", modules_to_save=["classifier"]),
    ),
    "vpt_deep": (
        _vit,
        lambda: hf_vpt.VisualPromptConfig(
            num_prompt_tokens=3, depth="deep", prompt_dropout=0.1, modules_to_save=["classifier"]
        ),
    ),
    "gated": (
        _vit,
        lambda: hf_vpt.GatedPromptConfig(num_prompt_tokens=3, gate_init=1.0, modules_to_save=["classifier"]),
    ),
    "apt": (_vit, lambda: hf_vpt.ApproxPromptConfig(num_prompt_tokens=3, rank=2, modules_to_save=["classifier"])),
    "generative": (_imagegpt, lambda: hf_vpt.GenerativePromptConfig(num_prompt_tokens=3, num_classes=3)),
}


def _batch(method: str) -> dict:
    generator = torch.Generator().manual_seed(7)
    if method == "generative":
        body = torch.randint(0, SOS, (2, 7), generator=generator)
        ids = torch.cat([torch.full((2, 1), SOS), body], dim=1)
        return {"input_ids": ids, "labels": ids, "class_labels": torch.tensor([0, 2])}
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator), "labels": torch.tensor([0, 2])}


def _output(method: str, model: nn.Module, batch: dict) -> torch.Tensor:
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", "class_labels")}
    return model(**kwargs).logits


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    raw = data.view(torch.uint8) if data.numel() else data
    header = f"{data.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + raw.numpy().tobytes()).hexdigest()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))  # non-persistent buffers too
    return tensors


def _base_name(key: str) -> str | None:
    """The name a tensor of the wrapped model had in the bare base model (None for adapter tensors)."""
    if "_prompt_bank." in key or ".modules_to_save." in key:
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _check_stage(stage: str, objects: dict, hashes: dict, model: nn.Module) -> None:
    # 1. the original tensor objects kept their bytes
    changed = [name for name, tensor in objects.items() if _digest(tensor) != hashes[name]]
    assert not changed, f"after {stage}: base tensors modified in place: {changed}"
    # 2. the tensors the wrapped model uses under the base model's state-dict names are the original ones
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = {}
    for key, tensor in base.state_dict(keep_vars=True).items():
        name = _base_name(key)
        if name is not None:
            seen[name] = _digest(tensor)
    unknown = sorted(set(seen) - set(hashes))
    assert not unknown, f"after {stage}: unexpected base tensors {unknown}"
    different = [name for name, digest in seen.items() if digest != hashes[name]]
    assert not different, f"after {stage}: the model now uses other values for {different}"


def _assert_bare(model: nn.Module) -> None:
    assert not hasattr(model, "peft_config")
    for name, module in model.named_modules():
        assert not any(getattr(module, hooks) for hooks in HOOK_DICTS), f"hooks left on {name or 'the model'}"
        assert "forward" not in vars(module), f"patched forward left on {name}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_base_model_bytes_survive_train_disable_delete_unload(method):
    make_base, make_config = METHODS[method]
    base = make_base()
    batch = _batch(method)
    with torch.no_grad():
        reference = _output(method, base, batch)
    objects = _named_tensors(base)
    hashes = {name: _digest(tensor) for name, tensor in objects.items()}

    model = get_peft_model(base, make_config())
    model.add_adapter("extra", make_config())
    _check_stage("attaching two adapters", objects, hashes, model)

    # train: an optimizer over every parameter (a common mistake) with weight decay, a few steps
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained_before and all("default" in n for n in trained_before)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if n in trained_before and not torch.equal(p, trained_before[n])]
    assert changed, "training changed no adapter parameter; the test would prove nothing"
    _check_stage("training", objects, hashes, model)

    model.eval()
    with model.disable_adapter():
        with torch.no_grad():
            disabled = _output(method, model, batch)
        _check_stage("a forward inside disable_adapter", objects, hashes, model)
    assert torch.equal(disabled, reference), "with adapters disabled the model must compute what the base computed"
    _check_stage("leaving disable_adapter", objects, hashes, model)

    model.set_adapter("extra")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["extra"]
    _check_stage("delete_adapter", objects, hashes, model)

    restored = model.unload()
    _check_stage("unload", objects, hashes, restored)
    now = _named_tensors(restored)
    assert sorted(now) == sorted(objects), "unload must give back exactly the original names"
    for name, tensor in now.items():
        assert _digest(tensor) == hashes[name], name
        # PEFT's `unload` puts the active adapter's copy of a `modules_to_save` head in place of the original (here
        # the never-trained copy of "extra", so the bytes match); every other tensor is the original object.
        if not name.startswith("classifier."):
            assert tensor is objects[name], f"{name} is not the original tensor object after unload"
    _assert_bare(restored)
    with torch.no_grad():
        assert torch.equal(_output(method, restored.eval(), batch), reference)
