"""`backbone_eval`: the frozen backbone stays in eval mode while the prompts and heads train, as in the official VPT
and gated-prompt code, on a backbone whose config has dropout."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftConfig, PeftModel, get_peft_model

import hf_vpt
from hf_vpt.core.validation import ConfigValueError
from hf_vpt.testing_utils import tiny_vit


DROPOUT = {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3}
METHODS = {
    "vpt": lambda **kw: hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep", **kw),
    "gated": lambda **kw: hf_vpt.GatedPromptConfig(num_prompt_tokens=3, **kw),
    "apt": lambda **kw: hf_vpt.ApproxPromptConfig(num_prompt_tokens=3, rank=2, **kw),
}


def _backbone(seed: int = 0) -> transformers.ViTForImageClassification:
    torch.manual_seed(seed)
    return tiny_vit(num_labels=3, num_hidden_layers=2, **DROPOUT)  # built from a config: in training mode


def _two_forwards(model, pixels) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(pixel_values=pixels).logits, model(pixel_values=pixels).logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_backbone_eval_makes_training_forward_deterministic(method):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = get_peft_model(_backbone(), METHODS[method](modules_to_save=["classifier"]))
    assert model.peft_config["default"].backbone_eval is True  # the default
    model.train()
    first, second = _two_forwards(model, pixels)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.eval()  # the reference: the same model with everything in eval mode
    torch.testing.assert_close(first, model(pixel_values=pixels).logits.detach(), rtol=0, atol=0)

    stochastic = get_peft_model(_backbone(), METHODS[method](modules_to_save=["classifier"], backbone_eval=False))
    stochastic.train()
    first, second = _two_forwards(stochastic, pixels)
    assert not torch.equal(first, second)  # the backbone's dropout is on: the official code would not do this


def test_trainable_modules_still_follow_train():
    model = get_peft_model(
        _backbone(), hf_vpt.VisualPromptConfig(num_prompt_tokens=3, prompt_dropout=0.5, modules_to_save=["classifier"])
    )
    model.train()
    tuner = model.base_model
    backbone_dropouts = [m for m in tuner.model.vit.modules() if isinstance(m, torch.nn.Dropout)]
    assert backbone_dropouts and not any(m.training for m in backbone_dropouts)
    assert all(m.training for m in tuner.banks.modules())  # the prompts' dropout trains
    head = tuner.model.classifier
    assert head.training and head.modules_to_save["default"].training  # the trained head follows train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = _two_forwards(model, pixels)
    assert not torch.equal(first, second)  # prompt dropout is the only noise, and it is on

    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()  # and back: the backbone stays in eval mode every time
    assert not any(m.training for m in backbone_dropouts) and head.training


def test_wrapping_a_model_in_training_mode_applies_it_at_once():
    backbone = _backbone()
    assert backbone.training
    model = get_peft_model(backbone, hf_vpt.VisualPromptConfig(num_prompt_tokens=3))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = _two_forwards(model, pixels)  # no `train()` call in between
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_backbone_eval_round_trips_and_is_validated(tmp_path):
    model = get_peft_model(_backbone(), hf_vpt.VisualPromptConfig(num_prompt_tokens=3, backbone_eval=False))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["backbone_eval"] is False
    assert PeftConfig.from_pretrained(tmp_path / "adapter").backbone_eval is False
    loaded = PeftModel.from_pretrained(_backbone(), tmp_path / "adapter", is_trainable=True)
    loaded.train()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = _two_forwards(loaded, pixels)
    assert not torch.equal(first, second)  # the loaded adapter kept the setting

    with pytest.raises(ConfigValueError, match="`backbone_eval` must be"):
        hf_vpt.VisualPromptConfig(backbone_eval="no")
    saved["backbone_eval"] = 1  # a hand-edited file: rejected on load, before the model is touched
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigValueError, match="`backbone_eval` must be"):
        PeftConfig.from_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize("backbone_eval", [True, False])
def test_gradient_checkpointing_still_recomputes_under_backbone_eval(backbone_eval):
    """With `gradient_checkpointing_enable()` a block's query projection runs twice per forward + backward (once again in the
    backward); backbone_eval must not switch that off, and must still keep the dropouts off."""
    model = get_peft_model(
        _backbone(), hf_vpt.VisualPromptConfig(num_prompt_tokens=3, depth="deep", backbone_eval=backbone_eval)
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    query = next(m for name, m in model.base_model.model.vit.named_modules() if name.endswith("q_proj"))
    query.register_forward_hook(lambda *args: calls.append(1))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(pixel_values=pixels).logits.sum().backward()
    assert len(calls) == 2
    dropouts = [m for m in model.base_model.model.vit.modules() if isinstance(m, torch.nn.Dropout)]
    assert any(m.training for m in dropouts) is not backbone_eval
