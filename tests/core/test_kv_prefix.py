"""Deep prompts as key/value prefixes give the same results as inserting them, and run only where that is exact."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import hf_vpt
import hf_vpt.tuners.visual_prompt.model as visual_prompt_model
from hf_vpt.testing_utils import (
    build,
    main_output,
    model_inputs,
    pixels,
    tiny_clip_text,
    tiny_siglip_text,
    tiny_vilt,
)


PREFIX_ARCHITECTURES = ["vit", "deit", "vit_mae", "dinov2", "dinov2_registers", "clip_vision", "clip", "siglip_vision"]


def _pair(name, attn="eager", adapter_names=("default",), **config):
    """The same adapter(s) on two copies of one model: key/value-prefix path and concatenation path."""
    models = []
    for kv_prefix in (True, False):
        base = build(name, attn=attn)
        model = None
        for i, adapter in enumerate(adapter_names):
            adapter_config = hf_vpt.VisualPromptConfig(num_prompt_tokens=4, kv_prefix=kv_prefix, **config)
            if model is None:
                model = get_peft_model(base, adapter_config, adapter_name=adapter)
            else:
                model.add_adapter(adapter, adapter_config)
            generator = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for param in model.base_model.visual_prompt_bank[adapter].parameters():
                    param.copy_(torch.randn(param.shape, generator=generator))
        models.append(model.eval())
    return models


@pytest.fixture
def prefix_calls(monkeypatch):
    """Counts the blocks that ran as key/value prefixes."""
    calls = []
    original = visual_prompt_model.project_prefix

    def counting(layout, prompts, at):
        calls.append(prompts.shape[0])
        return original(layout, prompts, at)

    monkeypatch.setattr(visual_prompt_model, "project_prefix", counting)
    return calls


def _prompt_grads(model):
    return [p.grad.clone() for p in model.base_model.visual_prompt_bank.parameters()]


@pytest.mark.parametrize("name", PREFIX_ARCHITECTURES)
@pytest.mark.parametrize("num_deep_layers", [None, 2], ids=["all-blocks", "first-2"])
def test_prefix_path_equals_concatenation_logits_and_gradients(name, num_deep_layers, prefix_calls):
    prefix, concat = _pair(name, num_deep_layers=num_deep_layers)
    inputs = model_inputs(name)
    outputs = []
    for model in (prefix, concat):
        out = main_output(name, model(**inputs))
        out.square().sum().backward()
        outputs.append(out)
    # all 3 blocks as prefixes; with prompts in the first 2 only, block 0 (block 1's prompts flow on)
    assert len(prefix_calls) == (3 if num_deep_layers is None else 1)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(_prompt_grads(prefix), _prompt_grads(concat)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_prefix_keys_are_computed_once_per_batch(prefix_calls):
    prefix, _ = _pair("vit")
    prefix(pixels(6))
    assert prefix_calls == [1, 1, 1]  # a [1, p, d] prefix per block, shared by the 6 samples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_path_follows_the_models_attention_implementation(attn, prefix_calls):
    prefix, concat = _pair("vit", attn=attn)
    with torch.no_grad():
        torch.testing.assert_close(prefix(pixels()).logits, concat(pixels()).logits, atol=1e-5, rtol=1e-5)
    assert prefix_calls


def test_sdpa_and_eager_prefix_paths_agree():
    sdpa, _ = _pair("vit", attn="sdpa")
    eager, _ = _pair("vit", attn="eager")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(pixels()).logits, eager(pixels()).logits, atol=1e-5, rtol=1e-5)


def test_padding_masks_are_extended_for_the_prefix(prefix_calls):
    prefix, concat = _pair("vit")
    tokens = 1 + (32 // 8) ** 2
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, -3:] = 0
    with torch.no_grad():
        a = prefix(pixels(), attention_mask=mask).logits
        b = concat(pixels(), attention_mask=mask).logits
        unmasked = prefix(pixels()).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[1], unmasked[1])
    assert prefix_calls


def test_per_sample_adapters_on_the_prefix_path(prefix_calls):
    prefix, concat = _pair("vit", adapter_names=("one", "two", "three"))
    names = ["two", "one", "three", "two"]
    with torch.no_grad():
        a = prefix(pixels(4), adapter_names=names).logits
        b = concat(pixels(4), adapter_names=names).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert prefix_calls == [4, 4, 4]  # one prefix per sample, still one forward


def test_bfloat16_prefix_path():
    prefix, concat = _pair("vit")
    for model in (prefix, concat):
        model.base_model.model.to(torch.bfloat16)
    with torch.no_grad():
        a = prefix(pixels().bfloat16()).logits.float()
        b = concat(pixels().bfloat16()).logits.float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_attention_maps_match_the_concatenation_path():
    prefix, concat = _pair("vit")
    with torch.no_grad():
        a = prefix(pixels(), output_attentions=True, output_hidden_states=True)
        b = concat(pixels(), output_attentions=True, output_hidden_states=True)
    for x, y in zip(a.attentions, b.attentions):
        assert x.shape == y.shape == (3, 4, 17, 17)
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"readout": "mean_model_norm"},  # the readout pools over the last block's prompt outputs
        {"keep_prompts_in_outputs": True},  # the caller asked to see the prompt positions
        {"depth": "shallow"},  # shallow prompts evolve through the blocks
        {"kv_prefix": False},
    ],
    ids=["mean-readout", "keep-prompts", "shallow", "switched-off"],
)
def test_concatenation_runs_wherever_the_prefix_would_be_wrong(config, prefix_calls):
    model = get_peft_model(build("vit"), hf_vpt.VisualPromptConfig(num_prompt_tokens=4, **config)).eval()
    model(pixels())
    assert prefix_calls == []


def test_gradient_checkpointing_on_the_prefix_path():
    grads = []
    for checkpointing in (False, True):
        prefix, _ = _pair("vit")
        if checkpointing:
            prefix.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        prefix.train()
        prefix(pixels()).logits.sum().backward()
        grads.append(_prompt_grads(prefix)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_unload_restores_the_attention_modules():
    prefix, _ = _pair("vit")
    base = prefix.unload()
    for layer in base.vit.layers:
        assert "forward" not in layer.attention.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_text_tower_prefix_respects_causality_and_padding(attn, prefix_calls):
    """CLIP's text tower: prompts after BOS; BOS must not see them, every later token must, padding stays masked."""

    outputs = []
    for kv_prefix in (True, False):
        torch.manual_seed(0)
        base = tiny_clip_text(eos_token_id=2).eval()
        base.set_attn_implementation(attn)
        model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=3, kv_prefix=kv_prefix)).eval()
        with torch.no_grad():
            for param in model.base_model.visual_prompt_bank.parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
        ids = torch.randint(3, 98, (2, 7), generator=torch.Generator().manual_seed(5))
        ids[:, -1] = 2
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        out = model(input_ids=ids, attention_mask=mask)
        out.pooler_output.square().sum().backward()
        outputs.append((out, _prompt_grads(model)))
    (prefix_out, prefix_grads), (concat_out, concat_grads) = outputs
    assert len(prefix_calls) == 3
    torch.testing.assert_close(prefix_out.last_hidden_state, concat_out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix_out.pooler_output, concat_out.pooler_output, atol=1e-5, rtol=1e-5)
    for a, b in zip(prefix_grads, concat_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_siglip_text_tower_prefix_equals_concatenation(prefix_calls):

    outputs = []
    for kv_prefix in (True, False):
        torch.manual_seed(0)
        base = tiny_siglip_text().eval()
        model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=3, kv_prefix=kv_prefix)).eval()
        with torch.no_grad():
            for param in model.base_model.visual_prompt_bank.parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
            ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(5))
            outputs.append(model(input_ids=ids))
    assert len(prefix_calls) == 3
    torch.testing.assert_close(outputs[0].pooler_output, outputs[1].pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0].last_hidden_state, outputs[1].last_hidden_state, atol=1e-5, rtol=1e-5)


def test_vilt_prefix_equals_concatenation_with_padding_and_attention_maps(prefix_calls):
    """ViLT's BERT-style attention (its blocks drop keyword arguments) takes the prefix too."""

    outputs = []
    for kv_prefix in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_vilt(num_images=1).eval(), hf_vpt.VisualPromptConfig(num_prompt_tokens=3, kv_prefix=kv_prefix)
        )
        with torch.no_grad():
            for param in model.base_model.visual_prompt_bank.parameters():
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), output_attentions=True)
        out.pooler_output.square().sum().backward()
        outputs.append((out, _prompt_grads(model)))
    (a, grads_a), (b, grads_b) = outputs
    assert len(prefix_calls) == 3
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.attentions, b.attentions):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
