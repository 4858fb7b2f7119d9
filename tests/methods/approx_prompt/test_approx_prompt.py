"""APT (ApproxPromptConfig) against a plain-PyTorch reference, plus deep VPT on CLIP's text tower and on ViLT.

The APT reference hooks the attention sub-layers of the *untouched* base model (a deep copy taken before hf_vpt wraps
anything), reads their input X̂ and output Y and replaces Y by the formula written out below, with the adapter's
parameters. The VPT references insert/replace the prompts by hand and build the extended attention masks themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

import hf_vpt
from hf_vpt.flops import deep_prompt_flops, extra_forward_flops
from hf_vpt.testing_utils import COMMON, build, model_inputs


BOS, EOS = 97, 98


# ---------------------------------------------------------------------------------------------------------------------
# tiny models not in conftest
# ---------------------------------------------------------------------------------------------------------------------
def _text_config():
    return dict(vocab_size=99, max_position_embeddings=24, bos_token_id=BOS, eos_token_id=EOS, **COMMON)


def _vilt_config(**extra):
    return transformers.ViltConfig(
        image_size=32, patch_size=8, max_position_embeddings=16, vocab_size=99, **COMMON, **extra
    )


def build_extra(name: str, seed: int = 0, attn: str = "eager"):
    torch.manual_seed(seed)
    if name == "clip_text":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_config()))
    elif name == "clip_both":
        vision = dict(image_size=32, patch_size=8, **COMMON)
        config = transformers.CLIPConfig(vision_config=vision, text_config=_text_config(), projection_dim=16)
        model = transformers.CLIPModel(config)
    elif name == "vilt_qa":
        model = transformers.ViltForQuestionAnswering(_vilt_config(num_labels=6))
    elif name == "vilt_nlvr":
        model = transformers.ViltForImagesAndTextClassification(
            _vilt_config(num_images=2, num_labels=2, modality_type_vocab_size=3)
        )
    elif name == "vilt_retrieval":
        model = transformers.ViltForImageAndTextRetrieval(_vilt_config())
    elif name == "vilt":
        model = transformers.ViltModel(_vilt_config())
    else:
        return build(name, seed=seed, attn=attn)
    if name.startswith("clip"):
        model.set_attn_implementation(attn)
    return model.eval()


def text_inputs(batch: int = 3, length: int = 7):
    """BOS, random tokens, EOS, then padding (attention mask 0) for all but the first sample."""
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 90, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids[:, 0] = BOS
    for b in range(batch):
        end = length - 1 - b  # sample b has b padding positions
        ids[b, end] = EOS
        ids[b, end + 1 :] = 0
        mask[b, end + 1 :] = 0
    return ids, mask


def extra_inputs(name: str, batch: int = 3) -> dict:
    ids, mask = text_inputs(batch)
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if name == "clip_text":
        return {"input_ids": ids, "attention_mask": mask}
    if name == "clip_both":
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if name == "vilt_nlvr":
        pixels2 = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack([pixels, pixels2], dim=1)}
    if name.startswith("vilt"):
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    return model_inputs(name, batch)


def outputs_of(name: str, output) -> list[torch.Tensor]:
    if name == "clip_text":
        return [output.last_hidden_state, output.pooler_output]
    if name in ("clip", "clip_both"):
        return [output.logits_per_image, output.text_embeds, output.image_embeds]
    if name == "vilt":
        return [output.last_hidden_state, output.pooler_output]
    return [output.logits]


def run(name, model, inputs):
    torch.manual_seed(11)  # ViLT samples the order of the image patches with torch.multinomial
    return outputs_of(name, model(**inputs))


# ---------------------------------------------------------------------------------------------------------------------
# APT reference
# ---------------------------------------------------------------------------------------------------------------------
def attention_sublayers(name: str, model) -> dict[str, list[torch.nn.Module]]:
    """The attention sub-layers of the untouched model, written out per architecture (not found by hf_vpt)."""
    if name == "vit":
        return {"vision": [layer.attention for layer in model.vit.layers]}
    if name in ("clip", "clip_both"):
        return {
            "vision": [layer.self_attn for layer in model.vision_model.encoder.layers],
            "text": [layer.self_attn for layer in model.text_model.encoder.layers],
        }
    if name == "clip_text":
        return {"text": [layer.self_attn for layer in model.encoder.layers]}
    vilt = model if name == "vilt" else model.vilt
    return {"multimodal": [layer.attention for layer in vilt.encoder.layer]}


def apt_formula(x, y, prompts, down, up, s):
    """exp(s) · (Y + stopgrad(max_j a) ⊙ a·P), a = ReLU(X̂ K̃ᵀ), K̃ = P + P W_downᵀ W_upᵀ (no dropout in eval)."""
    keys = prompts + prompts @ down.T @ up.T
    a = torch.relu(torch.einsum("bnd,pd->bnp", x, keys))
    w = a.max(dim=-1, keepdim=True).values
    return torch.exp(s) * (y + w * torch.einsum("bnp,pd->bnd", a, prompts))


def install_reference_apt(name, untouched, bank, layers=None):
    handles = []
    for kind, modules in attention_sublayers(name, untouched).items():
        if kind not in bank.prompts:
            continue
        rows = layers if layers is not None else range(len(modules))
        for row, index in enumerate(rows):
            params = [t[row].detach() for t in (bank.prompts[kind], bank.key_down[kind], bank.key_up[kind])]
            scale = bank.scale[kind][row].detach()

            def hook(module, args, kwargs, output, params=params, scale=scale):
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                y = output[0] if isinstance(output, tuple) else output
                new = apt_formula(x, y, *params, scale)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handles.append(modules[index].register_forward_hook(hook, with_kwargs=True))
    return handles


def randomise_apt(model, seed=3, adapter="default"):
    bank = model.base_model.approx_prompt_bank[adapter]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group, std in ((bank.prompts, 0.5), (bank.key_down, 1.0), (bank.key_up, 0.1), (bank.scale, 0.3)):
            for param in group.values():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return bank


APT_CASES = {
    "vit": None,
    "clip": ["vision", "text"],
    "clip_text": None,
    "vilt_qa": None,
    "vilt_nlvr": None,
    "vilt_retrieval": None,
    "vilt": None,
}


@pytest.mark.parametrize("name", sorted(APT_CASES))
def test_apt_matches_reference(name):
    base = build_extra(name)
    untouched = copy.deepcopy(base)
    inputs = extra_inputs(name)
    config = hf_vpt.ApproxPromptConfig(num_prompt_tokens=5, rank=3, towers=APT_CASES[name])
    model = get_peft_model(base, config).eval()
    bank = randomise_apt(model)
    with torch.no_grad():
        plain = run(name, untouched, inputs)
        ours = run(name, model, inputs)
        handles = install_reference_apt(name, untouched, bank)
        expected = run(name, untouched, inputs)
    for handle in handles:
        handle.remove()
    for o, e, p in zip(ours, expected, plain):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    assert max((o - p).abs().max() for o, p in zip(ours, plain)) > 1e-3, "APT must change the output"
    kinds = set(bank.prompts)
    assert kinds == ({"vision", "text"} if name == "clip" else set(attention_sublayers(name, untouched)))


def test_apt_subset_of_layers_and_shapes():
    base = build_extra("vit")
    untouched = copy.deepcopy(base)
    inputs = extra_inputs("vit")
    model = get_peft_model(base, hf_vpt.ApproxPromptConfig(num_prompt_tokens=4, rank=2, layers=[2, 0])).eval()
    bank = randomise_apt(model)
    assert tuple(bank.prompts["vision"].shape) == (2, 4, 32)
    assert tuple(bank.key_down["vision"].shape) == (2, 2, 32)
    assert tuple(bank.key_up["vision"].shape) == (2, 32, 2)
    assert tuple(bank.scale["vision"].shape) == (2,)
    with torch.no_grad():
        ours = run("vit", model, inputs)
        handles = install_reference_apt("vit", untouched, bank, layers=[0, 2])
        expected = run("vit", untouched, inputs)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)


def test_apt_init_follows_released_code():
    torch.manual_seed(0)
    model = get_peft_model(build_extra("vilt_qa"), hf_vpt.ApproxPromptConfig(num_prompt_tokens=200, rank=4))
    bank = model.base_model.approx_prompt_bank["default"]
    prompts, down = bank.prompts["multimodal"], bank.key_down["multimodal"]
    assert abs(prompts.std().item() - 0.02) < 0.002 and abs(down.std().item() - 1.0) < 0.05
    assert torch.all(bank.key_up["multimodal"] == 0) and torch.all(bank.scale["multimodal"] == 0)
    # p·d + 2·r·d + 1 per adapted attention sub-layer
    assert sum(p.numel() for p in bank.parameters()) == 3 * (200 * 32 + 2 * 4 * 32 + 1)


def test_apt_save_load_is_bit_exact(tmp_path):
    inputs = extra_inputs("clip_both")
    config = hf_vpt.ApproxPromptConfig(num_prompt_tokens=5, rank=3, towers=["vision", "text"])
    model = get_peft_model(build_extra("clip_both"), config).eval()
    randomise_apt(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert shapes == model.peft_config["default"].expected_bank_shapes()
    loaded = PeftModel.from_pretrained(build_extra("clip_both"), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], hf_vpt.ApproxPromptConfig)
    with torch.no_grad():
        for a, b in zip(run("clip_both", model, inputs), run("clip_both", loaded, inputs)):
            assert torch.equal(a, b)
    for key, value in model.base_model.approx_prompt_bank.state_dict().items():
        assert torch.equal(value, loaded.base_model.approx_prompt_bank.state_dict()[key])


def test_apt_adapter_file_checked_against_config(tmp_path):
    model = get_peft_model(build_extra("vit"), hf_vpt.ApproxPromptConfig(num_prompt_tokens=5, rank=3))
    model.save_pretrained(tmp_path)
    config = hf_vpt.ApproxPromptConfig.from_pretrained(tmp_path)
    config.rank = 2
    with pytest.raises(hf_vpt.AdapterLoadError, match="key_down"):
        config.check_adapter_file(str(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", ["vit", "vilt_qa", "clip_both"])
def test_apt_disable_and_unload_are_bit_identical(name):
    base = build_extra(name)
    untouched = copy.deepcopy(base)
    inputs = extra_inputs(name)
    towers = ["vision", "text"] if name == "clip_both" else None
    model = get_peft_model(base, hf_vpt.ApproxPromptConfig(num_prompt_tokens=4, rank=2, towers=towers)).eval()
    randomise_apt(model)
    with torch.no_grad():
        plain = run(name, untouched, inputs)
        with model.disable_adapter():
            disabled = run(name, model, inputs)
        prompted = run(name, model, inputs)
        unloaded = model.unload()
        after = run(name, unloaded, inputs)
    for p, d, a, q in zip(plain, disabled, after, prompted):
        assert torch.equal(p, d) and torch.equal(p, a)
        assert not torch.equal(p, q)
    assert not any("approx_prompt" in n or "base_layer" in n for n, _ in unloaded.named_modules())
    with pytest.raises(ValueError, match="no weight delta"):
        get_peft_model(build_extra("vit"), hf_vpt.ApproxPromptConfig(num_prompt_tokens=4)).merge_and_unload()


def test_apt_only_adapter_and_head_get_gradients():
    model = get_peft_model(
        build_extra("vilt_qa"),
        hf_vpt.ApproxPromptConfig(num_prompt_tokens=4, rank=2, modules_to_save=["classifier"]),
    )
    model.train()
    inputs = extra_inputs("vilt_qa")
    logits = model(**inputs).logits
    logits.pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all("approx_prompt_bank" in n or "modules_to_save" in n for n in with_grad)
    assert any("classifier.modules_to_save" in n for n in with_grad)
    for role in ("prompts", "key_down", "key_up", "scale"):
        assert any(f"{role}.multimodal" in n for n in with_grad)
    bank = model.base_model.approx_prompt_bank["default"]
    assert bank.scale["multimodal"].grad.abs().sum() > 0 and bank.key_up["multimodal"].grad.abs().sum() > 0


def test_apt_per_sample_adapters():
    base = build_extra("vit")
    inputs = extra_inputs("vit")
    model = get_peft_model(base, hf_vpt.ApproxPromptConfig(num_prompt_tokens=4, rank=2)).eval()
    model.add_adapter("other", hf_vpt.ApproxPromptConfig(num_prompt_tokens=6, rank=3, layers=[1]))
    randomise_apt(model, seed=3)
    randomise_apt(model, seed=5, adapter="other")
    with torch.no_grad():
        model.set_adapter("default")
        first = model(**inputs).logits
        model.set_adapter("other")
        second = model(**inputs).logits
        mixed = model(**inputs, adapter_names=["default", "other", "default"]).logits
    torch.testing.assert_close(mixed[[0, 2]], first[[0, 2]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], second[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_prompt_tokens": 0}, "num_prompt_tokens"),
        ({"num_prompt_tokens": 2.5}, "num_prompt_tokens"),
        ({"rank": 0}, "rank"),
        ({"layers": [-1]}, "layers"),
        ({"layers": [0, 0]}, "more than once"),
        ({"layers": []}, "layers"),
        ({"attentions": ["global"]}, "attentions"),
        ({"attentions": []}, "attentions"),
        ({"keep_prompts_in_outputs": True}, "no prompt tokens"),
        ({"towers": ["audio"]}, "towers"),
    ],
)
def test_apt_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf_vpt.ApproxPromptConfig(**kwargs)


def test_apt_config_errors_at_injection():
    with pytest.raises(ValueError, match="cross-attention"):
        get_peft_model(build_extra("vit"), hf_vpt.ApproxPromptConfig(attentions=["self", "cross"]))
    with pytest.raises(ValueError, match="does not have"):
        get_peft_model(build_extra("vit"), hf_vpt.ApproxPromptConfig(layers=[0, 3]))
    with pytest.raises(ValueError, match="only has these promptable towers"):
        get_peft_model(build_extra("vit"), hf_vpt.ApproxPromptConfig(towers=["text"]))


def test_default_towers():
    assert {hf_vpt.find_towers(build_extra("clip_both"))[i].kind for i in range(2)} == {"vision", "text"}
    vpt = get_peft_model(build_extra("clip_both"), hf_vpt.VisualPromptConfig(num_prompt_tokens=3))
    assert set(vpt.base_model.visual_prompt_bank["default"].embeddings) == {"vision"}
    apt = get_peft_model(build_extra("clip_both"), hf_vpt.ApproxPromptConfig(num_prompt_tokens=3))
    assert set(apt.base_model.approx_prompt_bank["default"].prompts) == {"vision"}
    vilt = get_peft_model(build_extra("vilt_qa"), hf_vpt.VisualPromptConfig(num_prompt_tokens=3))
    assert set(vilt.base_model.visual_prompt_bank["default"].embeddings) == {"multimodal"}


# ---------------------------------------------------------------------------------------------------------------------
# deep VPT on CLIP's text tower and on ViLT
# ---------------------------------------------------------------------------------------------------------------------
def _randomise_vpt(model, seed=3):
    bank = model.base_model.visual_prompt_bank["default"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.embeddings.values():
            param.copy_(torch.randn(param.shape, generator=generator))
    return bank.embeddings


def _deep_blocks(blocks, h, prompts, mask, at=1):
    p = prompts.shape[1]
    batch = h.shape[0]
    h = torch.cat([h[:, :at], prompts[0].expand(batch, -1, -1), h[:, at:]], dim=1)
    for i, block in enumerate(blocks):
        if i > 0:
            h = torch.cat([h[:, :at], prompts[i].expand(batch, -1, -1), h[:, at + p :]], dim=1)
        out = block(h, mask)
        h = out[0] if isinstance(out, tuple) else out
    return torch.cat([h[:, :at], h[:, at + p :]], dim=1)


def reference_clip_text(text_model, input_ids, attention_mask, prompts):
    """Prompts right after BOS as causal positions: text tokens see them, BOS does not; prompts see BOS and the
    prompts before them. Padded keys stay hidden. Pooled output: the first EOS of `input_ids`."""
    h = text_model.embeddings(input_ids=input_ids)
    batch, length = input_ids.shape
    total = length + prompts.shape[1]
    keys = torch.cat([attention_mask[:, :1], torch.ones(batch, prompts.shape[1]), attention_mask[:, 1:]], dim=1)
    allowed = torch.ones(total, total).tril().bool()[None] & keys.bool()[:, None, :]
    mask = torch.zeros(batch, 1, total, total).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    h = text_model.final_layer_norm(_deep_blocks(text_model.encoder.layers, h, prompts, mask))
    pooled = h[torch.arange(batch), (input_ids == EOS).int().argmax(dim=-1)]
    return h, pooled


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_deep_vpt_on_clip_text_tower(attn, padded):
    base = build_extra("clip_text", attn=attn)
    untouched = copy.deepcopy(base)
    ids, mask = text_inputs()
    if not padded:
        ids, mask = ids[:1].repeat(2, 1), mask[:1].repeat(2, 1)
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth="deep")).eval()
    prompts = _randomise_vpt(model)["text"].detach()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask if padded else None, output_hidden_states=True)
        h, pooled = reference_clip_text(untouched, ids, mask, prompts)
        plain = untouched(input_ids=ids, attention_mask=mask).pooler_output
    valid = mask.bool()
    torch.testing.assert_close(output.last_hidden_state[valid], h[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.pooler_output, pooled, atol=1e-5, rtol=1e-5)
    assert (output.pooler_output - plain).abs().max() > 1e-3
    assert all(t.shape[1] == ids.shape[1] for t in output.hidden_states)  # prompts never reach the caller


def test_deep_vpt_on_clip_model_text_tower_zero_shot():
    base = build_extra("clip_both")
    untouched = copy.deepcopy(base)
    inputs = extra_inputs("clip_both")
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth="deep", towers=["text"])
    model = get_peft_model(base, config).eval()
    prompts = _randomise_vpt(model)["text"].detach()
    with torch.no_grad():
        ours = model(**inputs).logits_per_image
        _, pooled = reference_clip_text(untouched.text_model, inputs["input_ids"], inputs["attention_mask"], prompts)
        text = F.normalize(untouched.text_projection(pooled), dim=-1)
        image = F.normalize(untouched.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output, dim=-1)
        expected = untouched.logit_scale.exp() * image @ text.t()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def reference_vilt(vilt, inputs, prompts):
    """[text CLS, P, text, image CLS, patches]: prompts after the text [CLS], visible to and seeing every token."""
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    pixel_mask = torch.ones(pixels.shape[0], pixels.shape[2], pixels.shape[3])
    h, masks = vilt.embeddings(ids, mask, None, pixels, pixel_mask, None, None, image_token_type_idx=1)
    batch, p = h.shape[0], prompts.shape[1]
    keys = torch.cat([masks[:, :1], torch.ones(batch, p), masks[:, 1:]], dim=1)
    extended = torch.zeros(batch, 1, 1, keys.shape[1]).masked_fill(
        ~keys.bool()[:, None, None, :], torch.finfo(torch.float32).min
    )
    h = vilt.layernorm(_deep_blocks(vilt.encoder.layer, h, prompts, extended))
    return h, vilt.pooler(h)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_deep_vpt_on_vilt(padded):
    base = build_extra("vilt_qa")
    untouched = copy.deepcopy(base)
    inputs = extra_inputs("vilt_qa")
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth="deep")).eval()
    prompts = _randomise_vpt(model)["multimodal"].detach()
    with torch.no_grad():
        torch.manual_seed(11)
        ours = model(**inputs, output_hidden_states=True)
        torch.manual_seed(11)
        _, pooled = reference_vilt(untouched.vilt, inputs, prompts)
        expected = untouched.classifier(pooled)
        plain = run("vilt_qa", untouched, inputs)[0]
    torch.testing.assert_close(ours.logits, expected, atol=1e-5, rtol=1e-5)
    assert (ours.logits - plain).abs().max() > 1e-4  # the random ViLT QA head has small logits (~0.2)
    length = inputs["input_ids"].shape[1] + 1 + 16
    assert all(t.shape[1] == length for t in ours.hidden_states)


def test_causal_mask_extension_matches_sdpa_is_causal():
    from hf_vpt.core.surgery import extend_attention_mask

    causal = torch.ones(5, 5).tril().bool()[None, None].expand(2, 1, 5, 5)
    extended = extend_attention_mask(causal, 1, 3, causal=True)
    assert torch.equal(extended[0, 0], torch.ones(8, 8).tril().bool())
    as_float = torch.zeros(2, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(extend_attention_mask(as_float, 1, 3, causal=True) == 0, extended)


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------------
def _counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter:  # no no_grad: torch's module tracker trips over it
        torch.manual_seed(11)
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name,seq_len",
    [("vit", 17), ("clip_both", {"vision": 17, "text": 7}), ("vilt_qa", 7 + 17), ("clip_text", 7)],
)
@pytest.mark.parametrize("method", ["apt", "deep"])
def test_flop_formulas_match_flop_counter(name, seq_len, method):
    base = build_extra(name)
    inputs = extra_inputs(name, batch=2)
    towers = ["vision", "text"] if name == "clip_both" else None
    if method == "apt":
        config = hf_vpt.ApproxPromptConfig(num_prompt_tokens=5, rank=3, towers=towers)
    else:
        config = hf_vpt.VisualPromptConfig(num_prompt_tokens=5, depth="deep", towers=towers, kv_prefix=False)
    expected = extra_forward_flops(base, config, seq_len, batch_size=2)
    baseline = _counted(base, inputs)
    model = get_peft_model(copy.deepcopy(base), config)
    assert _counted(model, inputs) - baseline == expected


def test_paper_flop_numbers():
    """ViLT-B/32, p = 200, N = 247 (the N that reproduces the README): 0.91 G vs 5.14 G MACs, −82.3 %."""
    apt_macs = 12 * 2 * 247 * 200 * 768
    deep_macs = (
        deep_prompt_flops(
            num_layers=12,
            hidden_size=768,
            intermediate_size=3072,
            seq_len=247,
            num_prompt_tokens=200,
            mode="kv_prefix",
        )
        // 2
    )
    assert round(apt_macs / 1e9, 2) == 0.91 and round(deep_macs / 1e9, 2) == 5.16
    assert round(1 - apt_macs / deep_macs, 3) == 0.823


def test_shared_kv_prefix_flops_match_flop_counter():
    base = build_extra("vit")
    inputs = extra_inputs("vit", batch=2)
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=5, depth="deep")  # the exact key/value-prefix path
    expected = extra_forward_flops(base, config, 17, batch_size=2, mode="shared_kv_prefix")
    baseline = _counted(base, inputs)
    assert _counted(get_peft_model(copy.deepcopy(base), config), inputs) - baseline == expected
