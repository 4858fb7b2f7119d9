"""VPT against references written here from the definition, on every supported architecture.

The reference re-composes the *untouched* base model (a deep copy taken before hf_vpt wraps anything) with the
VPT definition: `[special tokens, P, patches]` after the position embeddings, deep prompts replace the prompt slice
before blocks 1.., prompts are dropped after the last block. For ViT a second reference recomputes every block from
the raw weights in plain PyTorch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from shared_helpers import blocks_and_parts

import hf_vpt
from hf_vpt.testing_utils import ARCHITECTURES, build, main_output, model_inputs


def reference_vpt(name, untouched, inputs, prompts, at, deep_rows):
    """VPT from its definition on the untouched model. `prompts` is `[rows, p, d]`."""
    embed, blocks, finish = blocks_and_parts(name, untouched)
    if name == "clip":
        finish = finish(inputs)
    p = prompts.shape[1]
    h = embed(inputs)
    batch = h.shape[0]
    h = torch.cat([h[:, :at], prompts[0].expand(batch, -1, -1), h[:, at:]], dim=1)
    for i, block in enumerate(blocks):
        if 0 < i < deep_rows:
            h = torch.cat([h[:, :at], prompts[i].expand(batch, -1, -1), h[:, at + p :]], dim=1)
        h = block(h, None)
    h = torch.cat([h[:, :at], h[:, at + p :]], dim=1)
    return finish(h)


def _randomise_prompts(peft_model, seed=3):
    bank = peft_model.base_model.visual_prompt_bank["default"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.embeddings.values():
            param.copy_(torch.randn(param.shape, generator=generator))
    return bank


@pytest.mark.parametrize(
    "depth,num_deep_layers", [("shallow", None), ("deep", None), ("deep", 2)], ids=["shallow", "deep", "deep-first-2"]
)
def test_matches_reference_on_every_architecture(arch, depth, num_deep_layers):
    base = build(arch)
    untouched = copy.deepcopy(base)
    inputs = model_inputs(arch)
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth=depth, num_deep_layers=num_deep_layers)
    model = get_peft_model(base, config).eval()
    bank = _randomise_prompts(model)
    prompts = bank.embeddings["vision"].detach()

    with torch.no_grad():
        ours = main_output(arch, model(**inputs))
        expected = reference_vpt(arch, untouched, inputs, prompts, ARCHITECTURES[arch][1], prompts.shape[0])
        plain = main_output(arch, untouched(**inputs))
    assert prompts.shape[0] == (1 if depth == "shallow" else num_deep_layers or 3)  # path-free [rows, p, d]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-3, "the prompts must change the output"


def _plain_vit_logits(model, pixel_values, prompts, deep_rows):
    """ViT-with-VPT written out from the raw weights: patchify, attention, MLP, norms, head."""
    vit, cfg = model.vit, model.config
    emb = vit.embeddings
    patches = F.conv2d(
        pixel_values,
        emb.patch_embeddings.projection.weight,
        emb.patch_embeddings.projection.bias,
        stride=cfg.patch_size,
    )
    x = patches.flatten(2).transpose(1, 2)
    x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
    batch, p, heads = x.shape[0], prompts.shape[1], cfg.num_attention_heads
    x = torch.cat([x[:, :1], prompts[0].expand(batch, -1, -1), x[:, 1:]], dim=1)
    eps = cfg.layer_norm_eps
    for i, layer in enumerate(vit.layers):
        if 0 < i < deep_rows:
            x = torch.cat([x[:, :1], prompts[i].expand(batch, -1, -1), x[:, 1 + p :]], dim=1)
        a = layer.attention
        y = F.layer_norm(x, (cfg.hidden_size,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
        q, k, v = (F.linear(y, proj.weight, proj.bias) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k, v = (t.view(batch, -1, heads, cfg.hidden_size // heads).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / (cfg.hidden_size // heads) ** 0.5, dim=-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(batch, -1, cfg.hidden_size), a.o_proj.weight, a.o_proj.bias
        )
        y = F.layer_norm(x, (cfg.hidden_size,), layer.layernorm_after.weight, layer.layernorm_after.bias, eps)
        x = x + F.linear(
            F.gelu(F.linear(y, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias
        )
    x = F.layer_norm(x, (cfg.hidden_size,), vit.layernorm.weight, vit.layernorm.bias, eps)
    return F.linear(x[:, 0], model.classifier.weight, model.classifier.bias)


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_vit_matches_plain_pytorch_forward_from_weights(depth):
    base = build("vit")
    untouched = copy.deepcopy(base)
    pixel_values = model_inputs("vit")["pixel_values"]
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=5, depth=depth)).eval()
    prompts = _randomise_prompts(model).embeddings["vision"].detach()
    with torch.no_grad():
        ours = model(pixel_values=pixel_values).logits
        expected = _plain_vit_logits(untouched, pixel_values, prompts, prompts.shape[0])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("readout", ["mean_unit_norm", "mean_model_norm"])
def test_mae_readouts_match_the_official_definitions(readout):
    base = build("vit_mae")
    untouched = copy.deepcopy(base)
    inputs = model_inputs("vit_mae")
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth="deep", readout=readout)
    model = get_peft_model(base, config).eval()
    prompts = _randomise_prompts(model).embeddings["vision"].detach()
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state[:, 0]
        h = untouched.embeddings(inputs["pixel_values"], noise=inputs["noise"])[0]
        batch, p = h.shape[0], prompts.shape[1]
        h = torch.cat([h[:, :1], prompts[0].expand(batch, -1, -1), h[:, 1:]], dim=1)
        for i, block in enumerate(untouched.layers):
            if i > 0:
                h = torch.cat([h[:, :1], prompts[i].expand(batch, -1, -1), h[:, 1 + p :]], dim=1)
            h = block(h, None)
        pooled = h[:, 1:].mean(dim=1)  # all tokens but CLS, prompts included
        norm = untouched.layernorm
        if readout == "mean_unit_norm":
            expected = F.layer_norm(pooled, pooled.shape[-1:], eps=norm.eps)
        else:
            expected = norm(pooled)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
