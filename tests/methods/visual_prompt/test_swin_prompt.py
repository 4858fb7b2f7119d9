"""VPT on Swin (V1) against an independent plain-PyTorch reference written from the official design.

The reference below never calls hf_vpt: it reads the tiny Swin's weights and recomputes, one sample at a time, the
prompted forward described in `hf_vpt/tuners/visual_prompt/swin.py` (prompts prepended, normed prompts attached to
every window with zero position bias and no shift mask, prompt outputs averaged over the windows, patch merging of
`[P, P, P, P]`, deep prompts per stage and block, readout = final norm then the mean over all tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import SwinConfig, SwinForImageClassification, SwinModel, Swinv2Config, Swinv2Model

import hf_vpt


P = 3  # prompt tokens


def tiny_swin(cls=SwinForImageClassification, image_size=32, seed=0, **overrides):
    settings = {"depths": [2, 2], "num_heads": [2, 4], "mlp_ratio": 2.0, "num_labels": 5, **overrides}
    config = SwinConfig(image_size=image_size, patch_size=4, num_channels=3, embed_dim=8, window_size=4, **settings)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random everything, relative-position tables included (they start at zero)
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def images(batch, height=32, width=32, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomise_prompts(model, adapter="default", seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.base_model.visual_prompt_bank[adapter].parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def vpt(**kwargs):
    return hf_vpt.VisualPromptConfig(**{"num_prompt_tokens": P, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------------------------
def ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def regions(size, window, shift):
    """Shift-mask region of each index along one padded axis: [0, n-ws), [n-ws, n-shift), [n-shift, n)."""
    ids = torch.zeros(size, dtype=torch.long)
    ids[size - window : size - shift] = 1
    ids[size - shift :] = 2
    return ids


def ref_attention(tokens, attn, window, num_heads, mask_ids):
    """One window, one sample: tokens [p + ws², C]; mask_ids [ws²] shift regions of the window's patches or None."""
    n, channels = tokens.shape
    hd = channels // num_heads
    q = linear(tokens, attn.q_proj).view(n, num_heads, hd).transpose(0, 1)
    k = linear(tokens, attn.k_proj).view(n, num_heads, hd).transpose(0, 1)
    v = linear(tokens, attn.v_proj).view(n, num_heads, hd).transpose(0, 1)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    rows = torch.arange(window).repeat_interleave(window)  # (row, column) of each window position, row-major
    cols = torch.arange(window).repeat(window)
    d_rows = rows[:, None] - rows[None, :] + window - 1
    d_cols = cols[:, None] - cols[None, :] + window - 1
    index = d_rows * (2 * window - 1) + d_cols
    table = attn.relative_position_bias.relative_position_bias_table  # [(2ws-1)², heads]
    bias = torch.zeros(num_heads, n, n)  # prompt rows and columns: no bias, no mask
    bias[:, P:, P:] = table[index].permute(2, 0, 1)
    if mask_ids is not None:
        bias[:, P:, P:] -= 100.0 * (mask_ids[:, None] != mask_ids[None, :])
    weights = torch.softmax(scores + bias, dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(n, channels)
    return linear(out, attn.o_proj)


def ref_block(layer, x, prompts, height, width, odd, window_cfg):
    """x [H*W, C], prompts [p, C] of one sample -> (prompts, x)."""
    window, shift = window_cfg, (window_cfg // 2 if odd else 0)
    if min(height, width) <= window:
        window, shift = min(height, width), 0
    channels = x.shape[-1]
    tokens = torch.cat([prompts, x])
    normed = ln(tokens, layer.layernorm_before)
    normed_prompts, grid = normed[:P], normed[P:].view(height, width, channels)
    ph, pw = math.ceil(height / window) * window, math.ceil(width / window) * window
    grid = F.pad(grid, (0, 0, 0, pw - width, 0, ph - height))
    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    region = regions(ph, window, shift)[:, None] * 3 + regions(pw, window, shift)[None, :] if shift else None
    out_grid = torch.zeros_like(grid)
    prompt_outs = []
    heads = layer.attention.num_attention_heads
    for r in range(0, ph, window):
        for c in range(0, pw, window):
            patch = grid[r : r + window, c : c + window].reshape(-1, channels)
            ids = region[r : r + window, c : c + window].reshape(-1) if shift else None
            out = ref_attention(torch.cat([normed_prompts, patch]), layer.attention, window, heads, ids)
            prompt_outs.append(out[:P])
            out_grid[r : r + window, c : c + window] = out[P:].view(window, window, channels)
    out_grid = torch.roll(out_grid, shifts=(shift, shift), dims=(0, 1))[:height, :width].reshape(-1, channels)
    attended = torch.cat([torch.stack(prompt_outs).mean(0), out_grid])
    hidden = tokens + attended
    mlp = layer.mlp
    hidden = hidden + linear(F.gelu(linear(ln(hidden, layer.layernorm_after), mlp.fc1)), mlp.fc2)
    return hidden[:P], hidden[P:]


def ref_merge(x, prompts, merging, height, width):
    channels = x.shape[-1]
    grid = F.pad(x.view(height, width, channels), (0, 0, 0, width % 2, 0, height % 2))
    merged = torch.cat([grid[0::2, 0::2], grid[1::2, 0::2], grid[0::2, 1::2], grid[1::2, 1::2]], dim=-1)
    merged = merged.reshape(-1, 4 * channels)
    prompts = torch.cat([prompts] * 4, dim=-1)
    reduce = merging.reduction.weight
    return F.linear(ln(merged, merging.norm), reduce), F.linear(ln(prompts, merging.norm), reduce)


def reference(swin: SwinModel, pixel_values, block_prompts):
    """Per sample. `block_prompts[g]` is the [p, C_s] set block g (tower order) starts with, or None (carry)."""
    embeddings, (height0, width0) = swin.embeddings(pixel_values)  # upstream, unprompted
    pooled, last = [], []
    for sample in embeddings:
        x, prompts, height, width, g = sample, None, height0, width0, 0
        for stage in swin.encoder.layers:
            for j, layer in enumerate(stage.blocks):
                layer = getattr(layer, "base_layer", layer)  # the frozen block under hf_vpt's wrapper
                if block_prompts[g] is not None:
                    prompts = block_prompts[g]
                prompts, x = ref_block(layer, x, prompts, height, width, j % 2 == 1, swin.config.window_size)
                g += 1
            if stage.downsample is not None:
                x, prompts = ref_merge(x, prompts, stage.downsample, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        normed = ln(torch.cat([prompts, x]), swin.layernorm)
        pooled.append(normed.mean(0))
        last.append(normed[P:])
    return torch.stack(pooled), torch.stack(last)


def bank_block_prompts(model, depths=(2, 2)):
    """The per-block prompt sets as hf_vpt stores them (projection applied), None where a block carries."""
    bank = model.base_model.visual_prompt_bank["default"]
    sets = []
    for stage, depth in enumerate(depths):
        key = f"vision_stage{stage}"
        for row in range(depth):
            if key in bank.embeddings and row < bank.embeddings[key].shape[0]:
                value = bank.embeddings[key][row]
                sets.append(bank.projection[key](value) if key in bank.projection else value)
            else:
                sets.append(None)
    return [None if s is None else s.detach() for s in sets]


# ---------------------------------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------------------------------
CASES = {
    "shallow": ({"depth": "shallow"}, 32, 32),
    "deep": ({"depth": "deep"}, 32, 32),
    "deep_projected": ({"depth": "deep", "prompt_projection_dim": 6}, 32, 32),
    "deep_first_3_blocks": ({"depth": "deep", "num_deep_layers": 3}, 32, 32),
    # 40x48 pixels: a 10x12 patch grid, padded to 12x12 windows; stage 1 is 5x6, padded to 8x8 and shifted
    "shallow_padded": ({"depth": "shallow"}, 40, 48),
    "deep_padded": ({"depth": "deep"}, 40, 48),
    "deep_padded_eager": ({"depth": "deep"}, 40, 48, {"attn_implementation": "eager"}),
    "deep_padded_sdpa": ({"depth": "deep"}, 40, 48, {"attn_implementation": "sdpa"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_reference(case):
    kwargs, height, width, *model_kwargs = CASES[case]
    base = tiny_swin(image_size=(height, width), **(model_kwargs[0] if model_kwargs else {}))
    model = get_peft_model(base, vpt(**kwargs)).eval()
    randomise_prompts(model)
    x = images(3, height, width)
    with torch.no_grad():
        out = model(pixel_values=x)
        swin = model.base_model.model.swin
        pooled, last = reference(swin, x, bank_block_prompts(model))
        logits = F.linear(pooled, base.classifier.weight, base.classifier.bias)
        inner = swin(pixel_values=x)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(inner.pooler_output, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(inner.last_hidden_state, last, atol=1e-5, rtol=0)
    # the prompts matter: the base model gives something else
    with model.disable_adapter(), torch.no_grad():
        assert (model(pixel_values=x).logits - out.logits).abs().max() > 1e-3


def test_swin_model_pooled_output_matches_the_reference():
    model = get_peft_model(tiny_swin(SwinModel), vpt(depth="deep")).eval()
    randomise_prompts(model)
    x = images(2)
    with torch.no_grad():
        out = model(pixel_values=x)
        pooled, last = reference(model.base_model.model, x, bank_block_prompts(model))
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, last, atol=1e-5, rtol=0)


@pytest.mark.parametrize("depth, height, width", [("shallow", 32, 32), ("deep", 40, 48)])
def test_a_samples_output_does_not_depend_on_its_batch(depth, height, width):
    """The official code pairs window row b*nW + w with the prompts of sample (b*nW + w) mod B; hf_vpt pairs every
    window with its own sample's prompts, so a sample's logits are the same alone and in any batch. (Shallow prompts
    differ between samples after block 0; deep prompt outputs are read after the last block, which has several
    windows at 40x48 pixels.)"""
    model = get_peft_model(tiny_swin(image_size=(height, width)), vpt(depth=depth)).eval()
    randomise_prompts(model)
    x = images(3, height, width)
    with torch.no_grad():
        together = model(pixel_values=x).logits
        alone = torch.cat([model(pixel_values=x[i : i + 1]).logits for i in range(3)])
        reordered = model(pixel_values=x.flip(0)).logits.flip(0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together, reordered, atol=1e-5, rtol=0)


def test_kv_prefix_setting_does_not_change_swin_results():
    """No key/value-prefix path on windowed attention: both settings run the concatenation path."""
    outs = []
    for kv_prefix in (True, False):
        model = get_peft_model(tiny_swin(), vpt(depth="deep", kv_prefix=kv_prefix)).eval()
        randomise_prompts(model)
        with torch.no_grad():
            outs.append(model(pixel_values=images(2)).logits)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------------------------
# outputs, state, adapters
# ---------------------------------------------------------------------------------------------------------------
def test_hidden_states_and_attentions_have_the_original_shapes():
    base = tiny_swin(image_size=(40, 48), attn_implementation="eager")
    x = images(2, 40, 48)
    with torch.no_grad():
        plain = base(pixel_values=x, output_hidden_states=True, output_attentions=True)
    model = get_peft_model(base, vpt(depth="deep")).eval()
    randomise_prompts(model)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True, output_attentions=True)
    for key in ("hidden_states", "reshaped_hidden_states", "attentions"):
        assert [t.shape for t in out[key]] == [t.shape for t in plain[key]], key
    # the embeddings are not prompted; every later state is
    torch.testing.assert_close(out.hidden_states[0], plain.hidden_states[0], atol=0, rtol=0)
    assert (out.hidden_states[-1] - plain.hidden_states[-1]).abs().max() > 1e-3


STORED = "base_model.visual_prompt_bank."
SAVED_LAYOUTS = {
    "deep": ({"depth": "deep"}, {"embeddings.vision_stage0": (2, P, 8), "embeddings.vision_stage1": (2, P, 16)}),
    "shallow": ({"depth": "shallow"}, {"embeddings.vision_stage0": (1, P, 8)}),
    "deep_first_3_projected": (
        {"depth": "deep", "num_deep_layers": 3, "prompt_projection_dim": 6},
        {
            "embeddings.vision_stage0": (2, P, 6),
            "embeddings.vision_stage1": (1, P, 6),
            "projection.vision_stage0.weight": (8, 6),
            "projection.vision_stage0.bias": (8,),
            "projection.vision_stage1.weight": (16, 6),
            "projection.vision_stage1.bias": (16,),
        },
    ),
}


@pytest.mark.parametrize("layout", list(SAVED_LAYOUTS))
def test_save_load_round_trip_is_bit_exact_with_one_tensor_per_stage(tmp_path, layout):
    kwargs, shapes = SAVED_LAYOUTS[layout]
    model = get_peft_model(tiny_swin(), vpt(modules_to_save=["classifier"], **kwargs)).eval()
    randomise_prompts(model)
    x = images(2)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    prompt_shapes = {k.removeprefix(STORED): tuple(v.shape) for k, v in stored.items() if k.startswith(STORED)}
    assert prompt_shapes == shapes
    loaded = PeftModel.from_pretrained(tiny_swin(), tmp_path).eval()
    assert loaded.peft_config["default"].stage_shapes == {"vision": [[2, 8], [2, 16]]}
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, expected)


@pytest.mark.parametrize("value", [{"vision": [[2]]}, {"vision": []}, {"vision": [[2, True]]}, [[2, 8]]])
def test_a_broken_stage_record_is_refused(value):
    with pytest.raises(ValueError, match="`stage_shapes` must be"):
        vpt(stage_shapes=value)


def test_loading_onto_a_swin_with_other_stages_is_refused(tmp_path):
    model = get_peft_model(tiny_swin(), vpt(depth="shallow"))
    model.save_pretrained(tmp_path)
    other = tiny_swin(depths=[1, 3])  # the same 4 blocks and widths, split otherwise
    with pytest.raises(ValueError, match=r"stages \[depth, width\]"):
        PeftModel.from_pretrained(other, tmp_path)


def test_per_sample_adapters_equal_each_adapter_alone():
    model = get_peft_model(tiny_swin(), vpt(depth="deep"), adapter_name="deep").eval()
    model.add_adapter("shallow", vpt(depth="shallow"))
    randomise_prompts(model, "deep", seed=1)
    randomise_prompts(model, "shallow", seed=2)
    x = images(3)
    names = ["deep", "shallow", "deep"]
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone.append(model(pixel_values=x[i : i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)


def test_disable_adapter_and_unload_are_bit_identical_to_the_base_model():
    base = tiny_swin()
    x = images(2)
    with torch.no_grad():
        expected = base(pixel_values=x).logits
        expected_states = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, vpt(depth="deep")).eval()
    randomise_prompts(model)
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, expected)
    restored = model.unload()
    with torch.no_grad():
        assert torch.equal(restored(pixel_values=x).logits, expected)
    assert restored.state_dict().keys() == expected_states.keys()
    assert all(torch.equal(v, expected_states[k]) for k, v in restored.state_dict().items())


def test_only_the_prompts_train():
    model = get_peft_model(tiny_swin(), vpt(depth="deep", prompt_dropout=0.1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.visual_prompt_bank.default.embeddings.vision_stage0",
        "base_model.visual_prompt_bank.default.embeddings.vision_stage1",
    }
    model.train()
    model(pixel_values=images(2)).logits.sum().backward()
    bank = model.base_model.visual_prompt_bank["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.parameters())


def test_half_precision_base_keeps_float32_prompts_and_trains():
    model = get_peft_model(tiny_swin().to(torch.bfloat16), vpt(depth="deep", prompt_projection_dim=4))
    logits = model(pixel_values=images(2).to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    bank = model.base_model.visual_prompt_bank["default"]
    assert all(p.dtype == torch.float32 and p.grad is not None for p in bank.parameters())


def test_official_initialisation_bound_uses_the_first_stage_width():
    model = get_peft_model(tiny_swin(), vpt(depth="deep"))
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 8))
    for prompts in model.base_model.visual_prompt_bank["default"].embeddings.values():
        assert prompts.abs().max() <= bound
        assert prompts.abs().max() > 0.8 * bound


# ---------------------------------------------------------------------------------------------------------------
# what is refused
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        lambda: hf_vpt.GatedPromptConfig(num_prompt_tokens=P),
        lambda: hf_vpt.ApproxPromptConfig(),
    ],
    ids=["gated", "approx"],
)
def test_gated_and_approx_prompts_are_refused_on_swin(config):
    base = tiny_swin()
    before = repr(base)
    with pytest.raises(ValueError, match="only `VisualPromptConfig` can prompt it"):
        get_peft_model(base, config())
    assert repr(base) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [({"readout": "mean_unit_norm"}, "Use readout='default'"), ({"keep_prompts_in_outputs": True}, "2-D")],
)
def test_unsupported_vpt_options_are_refused_on_swin(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_swin(), vpt(**kwargs))


def test_swinv2_is_refused_with_the_reason():
    config = Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=4)
    with pytest.raises(ValueError, match="Swin V2 is not supported: its blocks normalise after"):
        get_peft_model(Swinv2Model(config), vpt())


def test_gradient_checkpointing_is_refused_in_training_with_the_fix():
    """transformers checkpoints whole Swin stages and replays them in backward, without the prompts that travel beside
    them: refused rather than wrong gradients; inference under no_grad still runs."""
    model = get_peft_model(tiny_swin(), vpt(depth="deep"))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.train()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        model(pixel_values=images(2))
    with torch.no_grad():
        assert model(pixel_values=images(2)).logits.shape == (2, 5)


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts and model cards
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_flop_formula_refuses_swin_and_points_to_measuring(depth):
    """The global-attention formulas do not describe prompts attached to every window: refused, not a wrong number.
    The fix the error names (torch's FLOP counter) does measure the prompts' cost, and it differs from what the ViT
    formula would have said with the first stage's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    from hf_vpt.flops import deep_prompt_flops, extra_forward_flops

    base = tiny_swin()
    with pytest.raises(ValueError, match=r"(?s)shifted windows.*every window.*FlopCounterMode"):
        extra_forward_flops(base, vpt(depth=depth), seq_len=64)
    model = get_peft_model(tiny_swin(attn_implementation="eager"), vpt(depth=depth)).eval()
    with pytest.raises(ValueError, match="No closed-form FLOP count for prompts on Swin"):
        extra_forward_flops(model, model.peft_config["default"], seq_len=64)

    def measured():
        with FlopCounterMode(display=False) as counter:
            model(pixel_values=images(1))
        return counter.get_total_flops()

    prompted = measured()
    with model.disable_adapter():
        plain = measured()
    extra = prompted - plain
    # what the ViT formula would claim for 4 blocks of the first stage's shapes (8 wide, MLP 16, 8x8 patches)
    global_formula = deep_prompt_flops(
        num_layers=4, hidden_size=8, intermediate_size=16, seq_len=64, num_prompt_tokens=P, mode="concat"
    )
    assert extra > 0 and extra != global_formula


def test_model_card_hides_the_stage_record(tmp_path):
    """`stage_shapes` is bookkeeping checked on load: kept in adapter_config.json, left off the card's settings."""
    import json

    model = get_peft_model(tiny_swin(), vpt(depth="deep", modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "num_prompt_tokens" in card and "stage_shapes" not in card
    assert json.loads((tmp_path / "adapter_config.json").read_text())["stage_shapes"] == {"vision": [[2, 8], [2, 16]]}
