"""The PEFT behaviours a user of VisualPromptConfig relies on."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import hf_vpt
from hf_vpt.testing_utils import build, model_inputs, pixels


def _config(**kwargs):
    return hf_vpt.VisualPromptConfig(**{"num_prompt_tokens": 4, "modules_to_save": ["classifier"], **kwargs})


def _randomise(model, adapter="default", seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.visual_prompt_bank[adapter].parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def _state_hashes(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_only_prompts_and_head_train_and_base_weights_stay_bit_identical():
    base = build("vit")
    before = _state_hashes(base)
    model = get_peft_model(base, _config(depth="deep"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.visual_prompt_bank.default.embeddings.vision",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train()
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(pixels(4, seed=step)).logits, torch.tensor([0, 1, 2, 3]))
        loss.backward()
        prompts = model.base_model.visual_prompt_bank["default"].embeddings["vision"]
        assert prompts.grad is not None and prompts.grad.abs().sum() > 0
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        optimizer.zero_grad()
    after = _state_hashes(model.base_model.model.vit)
    for name, tensor in after.items():
        original = before["vit." + name.replace(".base_layer", "")]
        assert torch.equal(tensor, original), name


def test_save_load_is_bit_exact_and_files_are_path_free(tmp_path):
    model = get_peft_model(build("vit"), _config(depth="deep", prompt_projection_dim=8)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "hf_vpt_card.json",
    ]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    bank_keys = {k for k in keys if "classifier" not in k}
    # no module path inside the backbone: the keys survive transformers renaming its internals
    assert bank_keys == {
        "base_model.visual_prompt_bank.embeddings.vision",
        "base_model.visual_prompt_bank.projection.vision.weight",
        "base_model.visual_prompt_bank.projection.vision.bias",
    }
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VISUAL_PROMPT" and saved["tower_shapes"] == {"vision": [3, 32]}
    assert isinstance(PeftConfig.from_pretrained(tmp_path), hf_vpt.VisualPromptConfig)

    loaded = PeftModel.from_pretrained(build("vit"), tmp_path).eval()
    x = pixels()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(build("vit"), tmp_path, is_trainable=True)
    assert trainable.base_model.visual_prompt_bank["default"].embeddings["vision"].requires_grad
    card = (tmp_path / "README.md").read_text()
    assert "import hf_vpt" in card and "hf_vpt" in card and "visual-prompt" in card


def test_per_sample_adapters_equal_each_adapter_alone():
    model = get_peft_model(build("vit"), _config(depth="deep"), adapter_name="one").eval()
    model.add_adapter("two", _config(depth="shallow", readout="default"))
    model.add_adapter("three", _config(depth="deep", num_deep_layers=2))
    for i, name in enumerate(["one", "two", "three"]):
        _randomise(model, name, seed=i)
    x = pixels(5)
    names = ["one", "two", "three", "two", "one"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        for name in ["one", "two", "three"]:
            model.set_adapter(name)
            alone = model(x).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone[rows], atol=1e-6, rtol=1e-6)


def test_per_sample_adapters_reject_bad_names_and_lengths():
    model = get_peft_model(build("vit"), _config(), adapter_name="one").eval()
    model.add_adapter("long", _config(num_prompt_tokens=6))
    with pytest.raises(ValueError, match="unknown adapters"):
        model(pixels(2), adapter_names=["one", "nope"])
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(pixels(2), adapter_names=["one"])
    with pytest.raises(ValueError, match="same number of prompt tokens"):
        model(pixels(2), adapter_names=["one", "long"])


def test_set_adapter_delete_adapter_and_several_adapters():
    model = get_peft_model(build("vit"), _config(), adapter_name="one").eval()
    model.add_adapter("two", _config())
    _randomise(model, "one", 0)
    _randomise(model, "two", 1)
    x = pixels()
    with torch.no_grad():
        out_a = model(x).logits
        model.set_adapter("two")
        out_b = model(x).logits
    assert not torch.allclose(out_a, out_b)
    assert model.base_model.visual_prompt_bank["two"].embeddings["vision"].requires_grad
    assert not model.base_model.visual_prompt_bank["one"].embeddings["vision"].requires_grad
    model.delete_adapter("two")
    assert set(model.peft_config) == {"one"} and set(model.base_model.visual_prompt_bank) == {"one"}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, out_a)


def test_two_active_prompt_adapters_are_rejected_with_a_hint():
    model = get_peft_model(build("vit"), hf_vpt.VisualPromptConfig(num_prompt_tokens=2), adapter_name="one")
    model.add_adapter("two", hf_vpt.VisualPromptConfig(num_prompt_tokens=2))
    model.base_model.set_adapter(["one", "two"])
    with pytest.raises(ValueError, match="cannot be stacked.*adapter_names"):
        model(pixels())


@pytest.mark.parametrize("name", ["vit", "clip", "siglip_vision", "dinov2"])
def test_disable_adapter_and_unload_are_bit_identical_to_the_base_model(name):
    base = build(name)
    # frozen like the PEFT base: nn.MultiheadAttention (SigLIP's pooling head) picks another kernel otherwise
    untouched = copy.deepcopy(base).requires_grad_(False)
    inputs = model_inputs(name)
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=3)).eval()
    _randomise(model)
    with torch.no_grad():
        expected = untouched(**inputs)
        with model.disable_adapter():
            disabled = model(**inputs)
        unloaded = model.unload()(**inputs)
    for out in (disabled, unloaded):
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(out[key], value), key
    assert not any(type(m).__name__.startswith("VisualPrompt") for m in model.base_model.model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in untouched.modules())


def test_merge_and_unload_explains_why_it_cannot_merge():
    model = get_peft_model(build("vit"), _config())
    with pytest.raises(ValueError, match="no weight delta"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="no weight delta"):
        model.merge_adapter()


def test_hidden_states_and_attentions_keep_the_original_length():
    model = get_peft_model(build("vit"), _config(depth="deep")).eval()
    _randomise(model)
    with torch.no_grad():
        out = model(pixels(), output_hidden_states=True, output_attentions=True)
    tokens = 1 + (32 // 8) ** 2
    assert len(out.hidden_states) == 4 and all(h.shape == (3, tokens, 32) for h in out.hidden_states)
    assert len(out.attentions) == 3 and all(a.shape == (3, 4, tokens, tokens) for a in out.attentions)

    keeping = get_peft_model(build("vit"), _config(keep_prompts_in_outputs=True)).eval()
    with torch.no_grad():
        kept = keeping(pixels(), output_hidden_states=True, output_attentions=True)
    assert kept.hidden_states[1].shape[1] == tokens + 4 and kept.attentions[0].shape[-1] == tokens + 4


def test_hidden_states_equal_the_prompted_sequence_without_prompt_positions():
    model = get_peft_model(build("vit"), _config(depth="shallow", keep_prompts_in_outputs=True)).eval()
    _randomise(model)
    with torch.no_grad():
        kept = model(pixels(), output_hidden_states=True).hidden_states
        model.peft_config["default"].keep_prompts_in_outputs = False
        stripped = model(pixels(), output_hidden_states=True).hidden_states
    for full, short in zip(kept, stripped):
        assert torch.equal(torch.cat([full[:, :1], full[:, 5:]], dim=1), short)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        base = build("vit")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model = get_peft_model(base, _config(depth="deep"))
        _randomise(model)
        model.train()
        model(pixels()).logits.sum().backward()
        grads.append(model.base_model.visual_prompt_bank["default"].embeddings["vision"].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_prompts(dtype):
    base = build("vit").to(dtype)
    model = get_peft_model(base, _config(depth="deep"))
    prompts = model.base_model.visual_prompt_bank["default"].embeddings["vision"]
    assert prompts.dtype == torch.float32
    logits = model(pixels().to(dtype)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert prompts.grad is not None and prompts.grad.dtype == torch.float32


def test_torch_compile_matches_eager():
    model = get_peft_model(build("vit"), _config(depth="deep")).eval()
    _randomise(model)
    x = pixels()
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model, backend="eager")(x).logits
    torch.testing.assert_close(compiled, eager)


def test_prompt_dropout_is_active_only_in_training():
    model = get_peft_model(build("vit"), _config(prompt_dropout=0.5))
    _randomise(model)
    x = pixels()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)
        model.train()
        torch.manual_seed(0)
        first = model(x).logits
        second = model(x).logits
    assert not torch.equal(first, second)


def test_vpt_uniform_initialisation_bound():
    model = get_peft_model(build("vit"), hf_vpt.VisualPromptConfig(num_prompt_tokens=50, depth="deep"))
    prompts = model.base_model.visual_prompt_bank["default"].embeddings["vision"]
    bound = (6 / (3 * 8 * 8 + 32)) ** 0.5  # 3·patch_h·patch_w + d
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.9 * bound
