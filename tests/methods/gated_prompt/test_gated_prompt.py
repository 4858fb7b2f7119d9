"""Gated Prompt Tuning against references written here from the definition, and the PEFT behaviours it must keep.

The reference re-composes the *untouched* base model (a deep copy taken before hf_vpt wraps anything) with the
method's definition: `[special tokens, P, patches]` after the embeddings; block l runs with its attention scores
divided by τ_l (a temporary hook on the untouched query projection); after blocks 0..L-2 the prompt slice becomes
`g_l · output + (1 − g_l) · input`; the prompts are dropped after the last block. For ViT a second reference
recomputes every block from the raw weights, with the temperature inside the softmax.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from shared_helpers import blocks_and_parts
from torch import nn

import hf_vpt
from hf_vpt.testing_utils import ARCHITECTURES, build, main_output, model_inputs, pixels


def _config(**kwargs):
    return hf_vpt.GatedPromptConfig(**{"num_prompt_tokens": 4, **kwargs})


def _bank(model, adapter="default"):
    return model.base_model.gated_prompt_bank[adapter]


def _randomise(model, adapter="default", seed=3):
    """Prompts ~ N(0, 1), gates in (0.2, 0.8), temperatures in (0.5, 2)."""
    bank = _bank(model, adapter)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.embeddings.values():
            param.copy_(torch.randn(param.shape, generator=generator))
        for param in bank.gate_logits.values():
            gates = 0.2 + 0.6 * torch.rand(param.shape, generator=generator)
            param.copy_(torch.log(gates / (1 - gates)))
        for param in bank.temperatures.values():
            param.copy_(0.5 + 1.5 * torch.rand(param.shape, generator=generator))
    return bank


def _values(bank, num_layers):
    prompts = bank.embeddings["vision"].detach()[0]
    gates = torch.sigmoid(bank.gate_logits["vision"].detach())
    temperatures = bank.temperatures["vision"].detach() if "vision" in bank.temperatures else torch.ones(num_layers)
    return prompts, gates, temperatures


def _query_linear(block):
    """The query projection of an untouched block, found here by name (independently of hf_vpt.layouts)."""
    found = [
        m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("q_proj", "query")
    ]
    assert len(found) == 1
    return found[0]


def reference_gated(name, untouched, inputs, prompts, gates, temperatures, at):
    """Gated prompt tuning from its definition on the untouched model. `prompts` is `[p, d]`."""
    embed, blocks, finish = blocks_and_parts(name, untouched)
    if name == "clip":
        finish = finish(inputs)
    p = prompts.shape[0]
    h = embed(inputs)
    h = torch.cat([h[:, :at], prompts.expand(h.shape[0], -1, -1), h[:, at:]], dim=1)
    for i, block in enumerate(blocks):
        # q / τ makes the scores q·kᵀ / (sqrt(d_head) · τ)
        handle = _query_linear(block).register_forward_hook(lambda m, a, out, t=temperatures[i]: out / t)
        try:
            out = block(h, None)
        finally:
            handle.remove()
        if i < len(blocks) - 1:
            mixed = gates[i] * out[:, at : at + p] + (1 - gates[i]) * h[:, at : at + p]
            out = torch.cat([out[:, :at], mixed, out[:, at + p :]], dim=1)
        h = out
    h = torch.cat([h[:, :at], h[:, at + p :]], dim=1)
    return finish(h)


# ------------------------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_temperature", [True, False], ids=["temperature", "no-temperature"])
def test_matches_reference_on_every_architecture(arch, learn_temperature):
    base = build(arch)
    untouched = copy.deepcopy(base)
    inputs = model_inputs(arch)
    model = get_peft_model(base, _config(learn_temperature=learn_temperature)).eval()
    bank = _randomise(model)
    num_layers = base.config.num_hidden_layers if arch != "clip" else base.config.vision_config.num_hidden_layers
    prompts, gates, temperatures = _values(bank, num_layers)
    assert gates.shape == (num_layers - 1,) and (0.2 < gates).all() and (gates < 0.8).all()
    assert set(bank.temperatures) == ({"vision"} if learn_temperature else set())

    at = ARCHITECTURES[arch][1]
    with torch.no_grad():
        ours = main_output(arch, model(**inputs))
        expected = reference_gated(arch, untouched, inputs, prompts, gates, temperatures, at)
        ungated = reference_gated(arch, untouched, inputs, prompts, torch.ones(num_layers), temperatures, at)
        untempered = reference_gated(arch, untouched, inputs, prompts, gates, torch.ones(num_layers), at)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    error = (ours - expected).abs().max()
    assert (ours - ungated).abs().max() > max(10 * error, 1e-5), "the gates must change the output"
    if learn_temperature:
        assert (ours - untempered).abs().max() > max(10 * error, 1e-5), "the temperatures must change the output"


def _plain_vit_logits(model, pixel_values, prompts, gates, temperatures):
    """Gated ViT written out from the raw weights, the temperature inside the softmax."""
    vit, cfg = model.vit, model.config
    emb = vit.embeddings
    conv = emb.patch_embeddings.projection
    x = F.conv2d(pixel_values, conv.weight, conv.bias, stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
    batch, p, heads, d = x.shape[0], prompts.shape[0], cfg.num_attention_heads, cfg.hidden_size
    x = torch.cat([x[:, :1], prompts.expand(batch, -1, -1), x[:, 1:]], dim=1)
    eps, num_layers = cfg.layer_norm_eps, len(vit.layers)
    for i, layer in enumerate(vit.layers):
        x_in = x
        a = layer.attention
        y = F.layer_norm(x, (d,), layer.layernorm_before.weight, layer.layernorm_before.bias, eps)
        q, k, v = (F.linear(y, proj.weight, proj.bias) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k, v = (t.view(batch, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / ((d // heads) ** 0.5 * temperatures[i])
        attn = torch.softmax(scores, dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(batch, -1, d), a.o_proj.weight, a.o_proj.bias)
        y = F.layer_norm(x, (d,), layer.layernorm_after.weight, layer.layernorm_after.bias, eps)
        x = x + F.linear(
            F.gelu(F.linear(y, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias
        )
        if i < num_layers - 1:
            mixed = gates[i] * x[:, 1 : 1 + p] + (1 - gates[i]) * x_in[:, 1 : 1 + p]
            x = torch.cat([x[:, :1], mixed, x[:, 1 + p :]], dim=1)
    x = F.layer_norm(x, (d,), vit.layernorm.weight, vit.layernorm.bias, eps)
    return F.linear(x[:, 0], model.classifier.weight, model.classifier.bias)


def test_vit_matches_plain_pytorch_forward_from_weights():
    base = build("vit")
    untouched = copy.deepcopy(base)
    x = pixels()
    model = get_peft_model(base, _config(num_prompt_tokens=5)).eval()
    prompts, gates, temperatures = _values(_randomise(model), 3)
    with torch.no_grad():
        ours = model(pixel_values=x).logits
        expected = _plain_vit_logits(untouched, x, prompts, gates, temperatures)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_mae_mean_model_norm_readout_is_the_official_gated_readout():
    base = build("vit_mae")
    untouched = copy.deepcopy(base)
    inputs = model_inputs("vit_mae")
    model = get_peft_model(base, _config(readout="mean_model_norm")).eval()
    prompts, gates, temperatures = _values(_randomise(model), 3)
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state[:, 0]
        h = untouched.embeddings(inputs["pixel_values"], noise=inputs["noise"])[0]
        h = torch.cat([h[:, :1], prompts.expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
        p = prompts.shape[0]
        for i, block in enumerate(untouched.layers):
            handle = _query_linear(block).register_forward_hook(lambda m, a, out, t=temperatures[i]: out / t)
            out = block(h, None)
            handle.remove()
            if i < 2:
                out = torch.cat(
                    [out[:, :1], gates[i] * out[:, 1 : 1 + p] + (1 - gates[i]) * h[:, 1 : 1 + p], out[:, 1 + p :]],
                    dim=1,
                )
            h = out
        expected = untouched.layernorm(h[:, 1:].mean(dim=1))  # all tokens but CLS, prompts included
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# parameters, gradients, clamp, inspection
# ------------------------------------------------------------------------------------------------------------------
def test_initial_values_and_gate_values_readout():
    model = get_peft_model(build("vit"), _config(gate_init=5))
    bank = _bank(model)
    assert bank.embeddings["vision"].shape == (1, 4, 32)
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    assert torch.equal(bank.gate_logits["vision"], torch.full((2,), -5.0))
    assert torch.equal(bank.temperatures["vision"], torch.ones(3))
    rows = hf_vpt.gate_values(model)
    assert rows == model.base_model.gate_values() == model.gate_values()  # PeftModel forwards to its tuner
    assert [r["block"] for r in rows] == [0, 1, 2] and {r["tower"] for r in rows} == {"vision"}
    assert [r["gate"] for r in rows[:2]] == pytest.approx([1 / (1 + math.exp(5))] * 2) and rows[2]["gate"] is None
    assert [r["temperature"] for r in rows] == [1.0, 1.0, 1.0]
    g = 1 / (1 + math.exp(5))
    assert rows[0]["selection_ratio"] == pytest.approx(g * (1 - g) / (g * (1 - g) + g))
    assert rows[2]["selection_ratio"] is None
    assert hf_vpt.GatedPromptConfig().gate_init == 10.0  # the official default

    no_temp = get_peft_model(build("vit"), _config(learn_temperature=False))
    assert [r["temperature"] for r in hf_vpt.gate_values(no_temp)] == [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match="GatedPromptConfig"):
        hf_vpt.gate_values(get_peft_model(build("vit"), hf_vpt.VisualPromptConfig(num_prompt_tokens=2)))
    with pytest.raises(ValueError, match="Unknown adapter"):
        hf_vpt.gate_values(model, adapter_name="nope")


@pytest.mark.parametrize("gate_init", [10.0, 3.0])
def test_gates_temperatures_and_prompts_train_and_the_base_stays_untouched(gate_init):
    base = build("vit")
    untouched = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, _config(gate_init=gate_init, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.gated_prompt_bank.default.embeddings.vision",
        "base_model.gated_prompt_bank.default.gate_logits.vision",
        "base_model.gated_prompt_bank.default.temperatures.vision",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    bank = _bank(model)
    start = {n: p.detach().clone() for n, p in bank.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train()
    for step in range(3):
        loss = F.cross_entropy(model(pixels(4, seed=step)).logits, torch.tensor([0, 1, 2, 3]))
        loss.backward()
        for name, param in bank.named_parameters():
            assert param.grad is not None and (param.grad != 0).all(), name  # every gate and τ, even at g = 4.5e-5
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in bank.named_parameters() if not torch.equal(p, start[n])}
    # Near γ = -10 a step can be smaller than float32 resolves (as in the official code); at -3 every tensor moves.
    assert changed >= set(start) - {"gate_logits.vision"}
    assert gate_init == 10.0 or changed == set(start)
    model.eval()
    x = pixels()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(x).logits, untouched(x).logits)


def test_temperature_clamp_on_the_value_used_and_after_every_step():
    """The official code clamps τ's storage in place (`.data.clamp_`) before every forward: the forward sees the
    clamped τ and the whole gradient reaches τ. An in-place edit inside the forward would only touch the gathered copy
    under FSDP / ZeRO-3, so hf_vpt clamps the value the forward uses (gradient passed through, as in the official
    code) and clamps the stored τ after every optimiser step that updated it (this test used to check the in-place
    clamp at forward time; the forward no longer edits the parameter)."""
    base = build("vit")
    untouched = copy.deepcopy(base)
    model = get_peft_model(base, _config())
    bank = _randomise(model)
    temperatures = bank.temperatures["vision"]
    model(pixels()).logits.sum().backward()
    temperatures.grad = torch.tensor([1e4, -1e4, 1e4])  # push τ far below 0.01 and above 10
    torch.optim.SGD([temperatures], lr=1.0).step()
    assert torch.equal(temperatures.detach(), torch.tensor([0.01, 10.0, 0.01]))  # clamped by the step hook

    # Out of range without an optimiser step (written by hand): the forward uses the clamped value...
    with torch.no_grad():
        temperatures.copy_(torch.tensor([-1e3, 1e3, 1e-4]))
    assert [r["temperature"] for r in hf_vpt.gate_values(model)] == pytest.approx([0.01, 10.0, 0.01])
    x = pixels()
    ours = model(x).logits
    prompts, gates, clamped = _values(bank, 3)
    clamped = clamped.clamp(0.01, 10.0)
    with torch.no_grad():
        expected = reference_gated("vit", untouched, {"pixel_values": x}, prompts, gates, clamped, 1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(temperatures.detach(), torch.tensor([-1e3, 1e3, 1e-4]))  # the forward edits no parameter

    # ...and the gradient is the official one: the gradient at the clamped value, not zeroed at the bounds.
    temperatures.grad = None
    ours.sum().backward()
    official = temperatures.detach().clamp(0.01, 10.0).requires_grad_()
    with torch.no_grad():
        bank.temperatures["vision"].copy_(official)
    bank.temperatures["vision"].grad, wanted = None, temperatures.grad.clone()
    model(x).logits.sum().backward()
    torch.testing.assert_close(wanted, temperatures.grad, rtol=0, atol=0)
    assert (wanted != 0).all()

    narrow = get_peft_model(build("vit"), _config(min_temperature=0.5, max_temperature=2.0))
    narrow_temperatures = _bank(narrow).temperatures["vision"]
    with torch.no_grad():
        narrow_temperatures.copy_(torch.tensor([0.1, 1.5, 7.0]))
    narrow(x).logits.sum().backward()
    other = torch.nn.Parameter(torch.ones(2))
    other.grad = torch.ones(2)
    torch.optim.SGD([other], lr=0.0).step()  # an optimiser that does not hold these temperatures leaves them alone
    assert torch.equal(narrow_temperatures.detach(), torch.tensor([0.1, 1.5, 7.0]))
    torch.optim.SGD([narrow_temperatures], lr=0.0).step()
    assert torch.equal(narrow_temperatures.detach(), torch.tensor([0.5, 1.5, 2.0]))


def test_two_forwards_then_one_backward_accumulate_gradients():
    model = get_peft_model(build("vit"), _config())
    _randomise(model)
    temperatures = _bank(model).temperatures["vision"]
    model(pixels()).logits.sum().backward()
    single = temperatures.grad.clone()
    temperatures.grad = None
    (model(pixels()).logits.sum() + model(pixels()).logits.sum()).backward()  # the second forward clamps again
    torch.testing.assert_close(temperatures.grad, 2 * single)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    grads = []
    for checkpointing in (False, True):
        base = build("vit")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = get_peft_model(base, _config())
        bank = _randomise(model)
        model.train()
        model(pixels()).logits.sum().backward()
        grads.append({n: p.grad.clone() for n, p in bank.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# ------------------------------------------------------------------------------------------------------------------
# PEFT behaviours
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_temperature", [True, False], ids=["temperature", "no-temperature"])
def test_save_load_is_bit_exact_and_files_are_path_free(tmp_path, learn_temperature):
    config = _config(learn_temperature=learn_temperature, gate_init=4, modules_to_save=["classifier"])
    model = get_peft_model(build("vit"), config).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected_keys = {
        "base_model.gated_prompt_bank.embeddings.vision",
        "base_model.gated_prompt_bank.gate_logits.vision",
    } | ({"base_model.gated_prompt_bank.temperatures.vision"} if learn_temperature else set())
    assert {k for k in keys if "classifier" not in k} == expected_keys == set(config.expected_bank_shapes())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GATED_PROMPT" and saved["gate_init"] == 4.0
    assert saved["learn_temperature"] is learn_temperature and saved["depth"] == "shallow"
    assert isinstance(PeftConfig.from_pretrained(tmp_path), hf_vpt.GatedPromptConfig)

    loaded = PeftModel.from_pretrained(build("vit"), tmp_path).eval()
    x = pixels()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    for name, param in _bank(model).named_parameters():
        assert torch.equal(param, _bank(loaded).get_parameter(name)), name
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(build("vit"), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in _bank(trainable).parameters())


def test_adapter_file_that_does_not_match_its_config_is_rejected(tmp_path):
    get_peft_model(build("vit"), _config()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "learn_temperature": False}))
    with pytest.raises(hf_vpt.AdapterLoadError, match="temperatures"):
        PeftModel.from_pretrained(build("vit"), tmp_path)


def test_several_adapters_and_per_sample_adapters_equal_each_adapter_alone():
    model = get_peft_model(build("vit"), _config(), adapter_name="one").eval()
    model.add_adapter("two", _config(learn_temperature=False))
    model.add_adapter("three", _config(gate_init=2, readout="mean_model_norm"))
    for i, name in enumerate(["one", "two", "three"]):
        _randomise(model, name, seed=i)
    x = pixels(5)
    names = ["one", "two", "three", "two", "one"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        alone = {}
        for name in ["one", "two", "three"]:
            model.set_adapter(name)
            alone[name] = model(x).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], alone[name][rows], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(alone["one"], alone["two"]) and not torch.allclose(alone["one"], alone["three"])
    assert hf_vpt.gate_values(model, "one") != hf_vpt.gate_values(model, "two")
    assert all(p.requires_grad for p in _bank(model, "three").parameters())
    assert not any(p.requires_grad for p in _bank(model, "one").parameters())
    model.delete_adapter("three")
    with torch.no_grad():
        model.set_adapter("one")
        torch.testing.assert_close(model(x).logits, alone["one"])


@pytest.mark.parametrize("name", ["vit", "clip", "siglip_vision", "dinov2"])
def test_disable_adapter_and_unload_are_bit_identical_to_the_base_model(name):
    base = build(name)
    untouched = copy.deepcopy(base).requires_grad_(False)
    inputs = model_inputs(name)
    model = get_peft_model(base, _config()).eval()
    _randomise(model)  # temperatures != 1: the query hooks must do nothing while disabled
    queries = [_query_linear(block) for block in model.base_model._towers[0].blocks]
    assert all(len(q._forward_hooks) == 1 for q in queries)
    with torch.no_grad():
        expected = untouched(**inputs)
        prompted = model(**inputs)
        with model.disable_adapter():
            disabled = model(**inputs)
        unloaded = model.unload()(**inputs)
    assert not torch.equal(main_output(name, prompted), main_output(name, expected))
    for out in (disabled, unloaded):
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(out[key], value), key
    assert all(not q._forward_hooks for q in queries)
    assert not any(type(m).__name__.startswith("GatedPrompt") for m in model.base_model.model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_parameters(dtype):
    reference = get_peft_model(build("vit"), _config()).eval()
    _randomise(reference)
    model = get_peft_model(build("vit").to(dtype), _config()).eval()
    _randomise(model)
    bank = _bank(model)
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    logits = model(pixels().to(dtype)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), reference(pixels()).logits, atol=5e-2, rtol=5e-2)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bank.parameters())


def test_hidden_states_keep_the_original_length():
    model = get_peft_model(build("vit"), _config()).eval()
    _randomise(model)
    with torch.no_grad():
        out = model(pixels(), output_hidden_states=True, output_attentions=True)
    tokens = 1 + (32 // 8) ** 2
    assert len(out.hidden_states) == 4 and all(h.shape == (3, tokens, 32) for h in out.hidden_states)
    assert all(a.shape == (3, 4, tokens, tokens) for a in out.attentions)


# ------------------------------------------------------------------------------------------------------------------
# configuration errors
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"gate_init": "ten"}, "`gate_init` must be a finite number"),
        ({"gate_init": float("nan")}, "`gate_init` must be a finite number"),
        ({"gate_init": True}, "`gate_init` must be a finite number"),
        ({"num_prompt_tokens": -1}, "`num_prompt_tokens` must be a positive integer"),
        ({"prompt_dropout": 1.0}, r"`prompt_dropout` must be in \[0, 1\)"),
        ({"depth": "deep"}, "shallow prompts only.*VisualPromptConfig\\(depth='deep'\\)"),
        ({"num_deep_layers": 2}, "shallow prompts only"),
        ({"learn_temperature": "yes"}, "`learn_temperature` must be True or False"),
        ({"min_temperature": 0.0}, "`min_temperature` must be a positive"),
        ({"min_temperature": 5.0, "max_temperature": 1.0}, "must not exceed `max_temperature`"),
        ({"readout": "cls"}, "`readout` must be one of"),
    ],
)
def test_bad_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_vpt.GatedPromptConfig(**kwargs)


def test_mean_readout_needs_a_cls_token():
    with pytest.raises(ValueError, match="no CLS token"):
        get_peft_model(build("siglip_vision"), _config(readout="mean_model_norm"))


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_sdpa_attention_matches_reference(name):
    base = build(name, attn="sdpa")
    untouched = copy.deepcopy(base)
    inputs = model_inputs(name)
    model = get_peft_model(base, _config()).eval()
    prompts, gates, temperatures = _values(_randomise(model), 3)
    with torch.inference_mode():  # the in-place clamp also runs under inference mode
        ours = main_output(name, model(**inputs))
    with torch.no_grad():
        expected = reference_gated(name, untouched, inputs, prompts, gates, temperatures, 1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_matches_eager():
    model = get_peft_model(build("vit"), _config()).eval()
    _randomise(model)
    x = pixels()
    with torch.no_grad():
        eager = model(x).logits
        compiled = torch.compile(model, backend="eager")(x).logits
    torch.testing.assert_close(compiled, eager)
