"""Bad input raises an error that names the problem and the fix, before the model is changed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hf_vpt
from hf_vpt.testing_utils import build, pixels, tiny_vit


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_prompt_tokens": 0}, "num_prompt_tokens` must be a positive integer"),
        ({"num_prompt_tokens": -3}, "num_prompt_tokens` must be a positive integer"),
        ({"prompt_dropout": 1.0}, r"prompt_dropout` must be in \[0, 1\)"),
        ({"prompt_dropout": -0.1}, r"prompt_dropout` must be in \[0, 1\)"),
        ({"depth": "medium"}, "`depth` must be one of"),
        ({"depth": "shallow", "num_deep_layers": 2}, "only applies to depth='deep'"),
        ({"num_deep_layers": 0}, "num_deep_layers` must be a positive integer"),
        ({"prompt_init": "xavier"}, "`prompt_init` must be one of"),
        ({"readout": "max"}, "`readout` must be one of"),
        ({"towers": ["audio"]}, "`towers` must be a non-empty list"),
        ({"target_modules": ["q_proj"]}, "finds the transformer blocks by structure"),
        ({"prompt_projection_dim": 0}, "prompt_projection_dim` must be a positive integer"),
    ],
)
def test_impossible_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vpt.VisualPromptConfig(**kwargs)


def _snapshot(model):
    return [(name, type(module)) for name, module in model.named_modules()], copy.deepcopy(model.state_dict())


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(name, type(module)) for name, module in model.named_modules()] == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not hasattr(model, "peft_config")


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = transformers.BertModel(config)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="supports these transformers architectures: ViT, DeiT"):
        get_peft_model(model, hf_vpt.VisualPromptConfig())
    _assert_unchanged(model, snapshot)


def test_mae_with_masking_is_rejected_with_the_fix():
    model = transformers.ViTMAEModel(
        transformers.ViTMAEConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    with pytest.raises(ValueError, match="mask_ratio=0.0"):
        get_peft_model(model, hf_vpt.VisualPromptConfig())


def test_mean_readout_on_a_model_without_cls_token():
    with pytest.raises(ValueError, match="has no CLS token"):
        get_peft_model(build("siglip_vision"), hf_vpt.VisualPromptConfig(readout="mean_model_norm"))


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(
        build("vit"), hf_vpt.VisualPromptConfig(num_prompt_tokens=4, modules_to_save=["classifier"])
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def _wider_vit():
    return tiny_vit(num_labels=5, hidden_size=48).eval()


def test_adapter_for_another_hidden_size_is_rejected_before_the_model_changes(saved_adapter):
    model = _wider_vit()
    snapshot = _snapshot(model)
    with pytest.raises(hf_vpt.AdapterLoadError, match="hidden size 32.*hidden size 48"):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_unchanged(model, snapshot)


def test_adapter_for_another_depth_is_rejected(saved_adapter):
    model = tiny_vit(num_labels=5, num_hidden_layers=5)
    with pytest.raises(hf_vpt.AdapterLoadError, match="3 blocks"):
        PeftModel.from_pretrained(model, saved_adapter)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "reshaped"])
def test_adapter_file_with_wrong_tensors_is_an_error_not_a_warning(saved_adapter, edit):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.visual_prompt_bank.embeddings.vision"
    if edit == "missing":
        del tensors[key]
    elif edit == "unexpected":
        tensors["base_model.visual_prompt_bank.embeddings.extra"] = torch.zeros(1)
    else:
        tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, path)
    model = build("vit")
    snapshot = _snapshot(model)
    with pytest.raises(hf_vpt.AdapterLoadError, match=edit if edit != "reshaped" else "shape mismatches"):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_unchanged(model, snapshot)


def test_truncated_safetensors_file(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(hf_vpt.AdapterLoadError, match="truncated or corrupted"):
        PeftModel.from_pretrained(build("vit"), saved_adapter)


def test_pickle_only_adapter_folder_is_refused(saved_adapter):
    tensors = load_file(saved_adapter / "adapter_model.safetensors")
    (saved_adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved_adapter / "adapter_model.bin")
    model = build("vit")
    snapshot = _snapshot(model)
    with pytest.raises(hf_vpt.AdapterLoadError, match="only a pickle file"):
        PeftModel.from_pretrained(model, saved_adapter)
    _assert_unchanged(model, snapshot)


def test_saving_as_pickle_is_refused(tmp_path):
    model = get_peft_model(build("vit"), hf_vpt.VisualPromptConfig())
    with pytest.raises(hf_vpt.AdapterLoadError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.bin").exists()


def test_weights_that_do_not_fit_roll_the_model_back(saved_adapter):
    """Second line of defence: a config passed in directly skips the file check; loading still refuses."""
    config = hf_vpt.VisualPromptConfig.from_pretrained(saved_adapter)
    tensors = load_file(saved_adapter / "adapter_model.safetensors")
    del tensors["base_model.visual_prompt_bank.embeddings.vision"]
    save_file(tensors, saved_adapter / "adapter_model.safetensors")
    model = build("vit")
    snapshot = _snapshot(model)
    with pytest.raises(hf_vpt.AdapterLoadError, match="missing tensors"):
        PeftModel.from_pretrained(model, saved_adapter, config=config)
    _assert_unchanged(model, snapshot)


def test_loading_a_second_adapter_that_does_not_fit_keeps_the_first(saved_adapter, tmp_path):
    model = PeftModel.from_pretrained(build("vit"), saved_adapter)
    before = model(pixels()).logits
    other = tmp_path / "other"
    wide = get_peft_model(_wider_vit(), hf_vpt.VisualPromptConfig(num_prompt_tokens=4))
    wide.save_pretrained(other)
    with pytest.raises(hf_vpt.AdapterLoadError, match="hidden size 48"):
        model.load_adapter(other, adapter_name="wide")
    assert set(model.peft_config) == {"default"}
    assert torch.equal(model(pixels()).logits, before)


def test_config_json_with_an_unknown_depth_is_refused(saved_adapter):
    path = saved_adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data["depth"] = "very deep"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="`depth` must be one of"):
        PeftModel.from_pretrained(build("vit"), saved_adapter)
