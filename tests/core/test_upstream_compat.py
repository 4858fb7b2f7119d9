"""The upstream-drift guard: every upstream internal goes through `hf_vpt._compat`, is checked when an adapter is
attached, and ImageGPT's cache is found whatever its argument is called (`past_key_values` up to transformers 5.23,
`cache` from 5.24)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import transformers
from packaging import version
from peft import get_peft_model
from torch import nn

import hf_vpt
from hf_vpt import _compat
from hf_vpt.core.layer import PromptedBlock
from hf_vpt.layouts import find_towers
from hf_vpt.sampling import PromptPrefixCache, autoregressive_sample
from hf_vpt.testing_utils import ARCHITECTURES, MICRO_VIT, build, tiny_imagegpt, tiny_vit


PACKAGE = Path(hf_vpt.__file__).resolve().parent
UPSTREAM = ("transformers", "peft", "diffusers", "accelerate")
N_POSITIONS = 12
SOS = 16
PROMPTS = 3


# ---------------------------------------------------------------------------------------------------------------
# the touch-point scan
# ---------------------------------------------------------------------------------------------------------------
def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _own_private_names(trees: dict[str, ast.AST]) -> set[str]:
    """`_names` that hf_vpt defines itself (functions, classes, attributes it assigns, class-level fields)."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Attribute):
                            names.add(sub.attr)
                        elif isinstance(sub, ast.Name):
                            names.add(sub.id)
            elif isinstance(node, ast.Call) and (
                getattr(node.func, "id", None) in ("setattr", "getattr")
                or getattr(node.func, "attr", None) == "__setattr__"
            ):
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    names.add(node.args[1].value)
    return {n for n in names if isinstance(n, str) and n.startswith("_")}


def upstream_touches(source: str, own_private: set[str], markers: set[str]) -> list[str]:
    """What in `source` touches an upstream internal outside `_compat`: deep or private upstream imports, a touch
    point's marker (attribute, name or string constant; docstrings aside), and private attributes hf_vpt does not
    define itself."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            if root in UPSTREAM:
                private = [a.name for a in node.names if a.name.startswith("_")]
                if node.module != root or private:
                    found.append(f"line {line}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM and "." in alias.name:
                    found.append(f"line {line}: import {alias.name}")
        elif isinstance(node, ast.Attribute):
            if node.attr in markers:
                found.append(f"line {line}: .{node.attr}")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in own_private:
                found.append(f"line {line}: private upstream attribute .{node.attr}")
            elif node.attr == "__dict__":
                found.append(f"line {line}: .__dict__")
        elif isinstance(node, ast.Name) and node.id in markers and node.id[0].isupper():  # upstream symbols
            found.append(f"line {line}: {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in markers:
                found.append(f"line {line}: {node.value!r}")
    return found


def _package_trees() -> dict[str, ast.AST]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text())
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_compat.py"
    }


def _markers() -> set[str]:
    return {marker for point in _compat.TOUCH_POINTS for marker in point.markers}


def test_no_upstream_internal_is_touched_outside_compat():
    trees = _package_trees()
    own = _own_private_names(trees)
    markers = _markers()
    offenders = {}
    for path in trees:
        touches = upstream_touches((PACKAGE / path).read_text(), own, markers)
        if touches:
            offenders[path] = touches
    assert not offenders, (
        "Upstream internals used outside hf_vpt/_compat.py (route them through a function there and list the touch "
        f"point in TOUCH_POINTS): {offenders}"
    )


def test_the_scan_catches_each_kind_of_touch():
    own, markers = set(), _markers()
    snippets = {
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS": "from transformers.modeling_utils",
        "from peft.tuners.tuners_utils import BaseTuner": "from peft.tuners.tuners_utils",
        "from transformers import _private": "from transformers import _private",
        "import diffusers.models": "import diffusers.models",
        "out = output.past_key_values": ".past_key_values",
        "kwargs.get('layer_past')": "'layer_past'",
        "block._gradient_checkpointing_func(f)": "._gradient_checkpointing_func",
        "x = module._some_new_upstream_private": "private upstream attribute ._some_new_upstream_private",
        "module.__dict__.pop('forward')": ".__dict__",
    }
    for source, expected in snippets.items():
        touches = upstream_touches(source, own, markers)
        assert any(expected in t for t in touches), (source, touches)
    # and leaves public API and docstrings alone
    clean = '"""Mentions past_key_values in prose."""\nfrom transformers import ViTModel\nfrom peft import PeftModel\n'
    assert upstream_touches(clean, own, markers) == []


def test_every_touch_point_is_spelled_in_compat():
    source = (PACKAGE / "_compat.py").read_text()
    for point in _compat.TOUCH_POINTS:
        assert point.package in _compat.VERIFIED or point.package == "torch"
        for marker in point.markers:
            assert marker in source, f"touch point {point.name!r}: marker {marker!r} is not used in _compat.py"


def test_readme_compatibility_table_matches_the_verified_range():
    readme = (PACKAGE.parent / "README.md").read_text()
    for package, (oldest, newest) in _compat.VERIFIED.items():
        assert f"| {package} | {oldest} | {newest} |" in readme, f"README's compatibility row for {package}"


def test_verified_range_matches_pyproject():
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    requirements = {req.split(">=")[0].strip(): req for req in pyproject["project"]["dependencies"] if ">=" in req}
    for package, (oldest, _) in _compat.VERIFIED.items():
        assert package in requirements, f"pyproject.toml declares no lower bound for {package}"
        assert requirements[package].split(">=")[1].split(",")[0] == oldest, (package, requirements[package])


# ---------------------------------------------------------------------------------------------------------------
# finding the cache, both spellings
# ---------------------------------------------------------------------------------------------------------------
class _OldSpelling(nn.Module):
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        return input_ids


class _NewSpelling(nn.Module):
    def forward(self, input_ids=None, cache: transformers.Cache | None = None, attention_mask=None, **kwargs):
        return input_ids


class _OnlyKwargs(nn.Module):
    def forward(self, input_ids=None, **kwargs):
        return input_ids


@pytest.mark.parametrize("module_class", [_OldSpelling, _NewSpelling])
@pytest.mark.parametrize("passed_as", ["positional", "own_keyword", "past_key_values", "cache"])
def test_find_cache_by_signature_or_object(module_class, passed_as):
    module, cache = module_class(), transformers.DynamicCache()
    own = "past_key_values" if module_class is _OldSpelling else "cache"
    ids = torch.zeros(1, 2, dtype=torch.long)
    if passed_as == "positional":
        args, kwargs = (ids, cache), {}
    else:
        name = own if passed_as == "own_keyword" else passed_as
        args, kwargs = (ids,), {name: cache}
    assert _compat.find_cache(module, args, kwargs) is cache
    assert _compat.find_cache(module, (ids,), {}) is None
    assert _compat.imagegpt_cache_keyword(module) == own


def test_find_cache_of_a_forward_without_a_cache_parameter():
    module, cache = _OnlyKwargs(), transformers.DynamicCache()
    assert _compat.find_cache(module, (), {"input_ids": None, "whatever_it_is_called": cache}) is cache
    with pytest.raises(_compat.UpstreamDriftError, match=r"transformers \S+'s ImageGPT cache \(_OnlyKwargs\)"):
        _compat.imagegpt_cache_keyword(module)


def test_output_cache_whatever_the_field_is_called():
    cache = transformers.DynamicCache()
    assert _compat.output_cache(transformers.modeling_outputs.CausalLMOutputWithCrossAttentions(logits=None)) is None
    assert _compat.output_cache((torch.zeros(1), cache)) is cache
    output = transformers.modeling_outputs.BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=torch.zeros(1))
    output["some_future_name"] = cache
    assert _compat.output_cache(output) is cache


# ---------------------------------------------------------------------------------------------------------------
# ImageGPT on the installed transformers: cached == uncached, with every spelling it accepts
# ---------------------------------------------------------------------------------------------------------------
def _imagegpt():
    return tiny_imagegpt(codebook_size=SOS, n_positions=N_POSITIONS)


def _prompted_imagegpt(seed: int = 0, num_classes: int | None = 3):
    torch.manual_seed(seed)
    base = _imagegpt().eval()
    config = hf_vpt.GenerativePromptConfig(num_prompt_tokens=PROMPTS, num_classes=num_classes)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for param in model.base_model.generative_prompt_bank["default"].parameters():
            param.add_(torch.randn(param.shape) * 0.5)
    return model


def _accepted_cache_keywords(model) -> list[str]:
    """The installed transformers' own keyword, plus `past_key_values` while transformers still accepts it
    (deprecated in 5.24, to be removed in 5.40)."""
    own = _compat.imagegpt_cache_keyword(model)
    still_accepted = version.parse(transformers.__version__) < version.parse("5.40")
    return sorted({own, "past_key_values"} if still_accepted else {own})


def test_the_installed_imagegpt_takes_a_known_cache_argument():
    model = _prompted_imagegpt()
    assert _compat.imagegpt_cache_keyword(model) in _compat.CACHE_ARGUMENT_NAMES


@pytest.mark.parametrize("through", ["causal_lm", "transformer"])
def test_cached_steps_equal_a_full_forward_with_every_cache_spelling(through):
    # called on the transformer alone, no hook takes `class_labels` off the call: use unconditional prompts there
    model = _prompted_imagegpt(num_classes=3 if through == "causal_lm" else None)
    labels = {"class_labels": torch.tensor([2, 0])} if through == "causal_lm" else {}
    ids = torch.randint(0, SOS, (2, N_POSITIONS))
    ids[:, 0] = SOS
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False, **labels).logits
        head = model.get_base_model().lm_head
        for keyword in _accepted_cache_keywords(model):
            if through == "causal_lm":
                call, read = model, (lambda out: out.logits)
            else:  # the transformer alone: its forward hook sees the cache under whichever name the caller used
                transformer = model.get_base_model().transformer

                def call(**kw):
                    return transformer(**kw)

                def read(out):
                    return head(out.last_hidden_state)

            first = call(input_ids=ids[:, :5], use_cache=True, **labels)
            cache = _compat.output_cache(first)
            steps = [read(first)]
            for t in range(5, N_POSITIONS):
                out = call(input_ids=ids[:, t : t + 1], use_cache=True, **{keyword: cache}, **labels)
                cache = _compat.output_cache(out)
                steps.append(read(out))
            assert _compat.cache_length(cache) == PROMPTS + N_POSITIONS
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5, msg=keyword)


def test_cached_greedy_sampling_equals_uncached_greedy_decoding_token_for_token():
    model = _prompted_imagegpt(seed=1)
    labels = torch.tensor([0, 1, 2, 1])
    cached = autoregressive_sample(model, class_labels=labels, temperature=0)
    uncached = autoregressive_sample(model, class_labels=labels, temperature=0, use_cache=False)
    # an independent greedy decoder: a full prompted forward per token, argmax of the last position
    sequence = torch.full((4, 1), SOS)
    with torch.no_grad():
        while sequence.shape[1] <= N_POSITIONS:
            logits = model(input_ids=sequence, class_labels=labels, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.shape == (4, N_POSITIONS)
    assert torch.equal(cached, sequence[:, 1:])
    assert torch.equal(uncached, sequence[:, 1:])


def test_sequences_past_n_positions_get_hf_vpts_error_on_the_cached_path():
    model = _prompted_imagegpt()
    labels = torch.tensor([0])
    keyword = _compat.imagegpt_cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, N_POSITIONS, dtype=torch.long), class_labels=labels, use_cache=True)
        with pytest.raises(ValueError, match=r"ImageGPT has 12 positions"):
            model(
                input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True, **{keyword: _compat.output_cache(out)}
            )


# ---------------------------------------------------------------------------------------------------------------
# the prefix cache follows the base model's weights
# ---------------------------------------------------------------------------------------------------------------
def _fresh_prefix_keys(model, labels):
    return _compat.cache_layers(PromptPrefixCache(model).for_batch(class_labels=labels))[0][0]


@pytest.mark.parametrize("how", ["load_state_dict", "in_place_no_grad", "replaced_parameter"])
def test_prompt_prefix_cache_notices_base_weight_changes(how):
    model = _prompted_imagegpt()
    labels = torch.tensor([0, 1])
    prefixes = PromptPrefixCache(model)
    before = _compat.cache_layers(prefixes.for_batch(class_labels=labels))[0][0].clone()
    assert prefixes.num_prefix_forwards == 1
    prefixes.for_batch(class_labels=labels)
    assert prefixes.num_prefix_forwards == 1  # nothing changed: served from the cache
    transformer = model.get_base_model().transformer
    block = transformer.h[0].get_base_layer()
    with torch.no_grad():
        if how == "load_state_dict":
            state = {k: v + 0.1 for k, v in block.ln_1.state_dict().items()}
            block.ln_1.load_state_dict(state)
        elif how == "in_place_no_grad":
            block.ln_1.weight.mul_(1.5)
        else:
            block.ln_1.weight = nn.Parameter(block.ln_1.weight * 1.5)
    after = _compat.cache_layers(prefixes.for_batch(class_labels=labels))[0][0]
    assert prefixes.num_prefix_forwards == 2
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _fresh_prefix_keys(model, labels), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# drift is refused when the adapter is attached, before anything changes
# ---------------------------------------------------------------------------------------------------------------
def _tiny_vit():
    torch.manual_seed(0)
    return tiny_vit(num_labels=2, **MICRO_VIT)


def _assert_refused(model, config, match: str):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(_compat.UpstreamDriftError, match=match) as raised:
        get_peft_model(model, config)
    message = str(raised.value)
    version = _compat.installed_version("transformers")
    assert f"transformers {version}" in message and "Supported: transformers" in message
    assert not any(isinstance(m, PromptedBlock) for m in model.modules()), "the model was changed"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_an_imagegpt_without_a_cache_argument_is_refused(monkeypatch):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(transformers.ImageGPTModel, "forward", forward)
    base = _imagegpt()
    config = hf_vpt.GenerativePromptConfig(num_prompt_tokens=2)
    _assert_refused(base, config, r"ImageGPT cache \(ImageGPTModel\): .*no cache argument")


def test_an_imagegpt_without_its_causal_buffer_is_refused():
    base = _imagegpt()
    for module, _ in _compat.imagegpt_causal_buffers(base.transformer.h[1]):
        del module._buffers["bias"]
    _assert_refused(base, hf_vpt.GenerativePromptConfig(num_prompt_tokens=2), r"ImageGPT causal buffer .*block 1")


def test_an_attention_with_another_forward_signature_is_refused(monkeypatch):
    model = _tiny_vit()
    layout = find_towers(model)[0].attention_layouts[0]  # found by structure, as hf_vpt does
    if layout is None:
        pytest.skip("this transformers' ViT attention has no known shape: deep prompts concatenate, no prefix runs")
    attention = layout.attention

    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        raise AssertionError("never called")

    monkeypatch.setattr(type(attention), "forward", forward)
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=2, depth="deep")
    _assert_refused(model, config, rf"attention interface \(ViTModel\): `{type(attention).__name__}.forward` is")


def test_a_model_module_without_its_eager_attention_is_refused(monkeypatch):
    model = _tiny_vit()
    monkeypatch.delattr(transformers.models.vit.modeling_vit, "eager_attention_forward")
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=2, depth="deep")
    _assert_refused(model, config, r"has no `eager_attention_forward`")


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_a_block_whose_mask_cannot_be_found_is_refused(monkeypatch, depth):
    model = _tiny_vit()

    def forward(self, hidden_states, *args, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(type(find_towers(model)[0].blocks[0]), "forward", forward)
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=2, depth=depth)
    _assert_refused(model, config, r"block call convention \(ViTModel\): .*a named `attention_mask`")


def test_a_block_that_cannot_pass_the_key_value_prefix_on_is_refused(monkeypatch):
    model = _tiny_vit()

    def forward(self, hidden_states, attention_mask=None):
        raise AssertionError("never called")

    monkeypatch.setattr(type(find_towers(model)[0].blocks[0]), "forward", forward)
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=2, depth="deep")
    _assert_refused(model, config, r"block call convention \(ViTModel\): .*`\*\*kwargs` passed on to its attention")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_guard_passes_on_every_architecture(name):
    """Every supported tower passes the attach-time check on the installed upstream versions."""
    towers = find_towers(build(name))
    assert towers
    for tower in towers:
        _compat.check_tower(tower)
