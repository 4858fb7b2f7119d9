"""The method registry: every method is declared once, in its folder, and a new method needs its folder and one
registration line, nothing else. The throw-away method below is defined here, in the test, and registered with
one `register(...)` call; the card, the FLOP lookup and the training variants then know it."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

import hf_vpt
from hf_vpt._registry import peft_type
from hf_vpt.core.config import PromptConfigBase
from hf_vpt.core.layer import PromptedBlock
from hf_vpt.core.surgery import insert_tokens, remove_tokens
from hf_vpt.core.tuner import PromptTunerModel
from hf_vpt.core.validation import MAX_PROMPT_TOKENS, Int
from hf_vpt.flops import extra_forward_flops
from hf_vpt.registry import (
    MethodSpec,
    TrainingVariant,
    method_spec,
    register,
    registered_methods,
    training_variant,
    training_variants,
    unregister,
)
from hf_vpt.testing_utils import tiny_vit


PACKAGE = Path(hf_vpt.__file__).parent


# ---------------------------------------------------------------------------------------------------------------
# a throw-away method: config, layer and model, as a method folder would hold them
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ToyPromptConfig(PromptConfigBase):
    """Shallow prompts without any option: the smallest hf_vpt method."""

    FIELD_RULES = {"num_prompt_tokens": Int(1, MAX_PROMPT_TOKENS)}

    num_prompt_tokens: int = field(default=2, metadata={"help": "Prompt tokens inserted before block 0."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("toy_prompt")

    @property
    def bank_key_prefix(self) -> str:
        return "base_model.toy_prompt_bank."

    def expected_bank_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{self.bank_key_prefix}embeddings.{kind}": (self.num_prompt_tokens, hidden)
            for kind, (_, hidden) in (self.tower_shapes or {}).items()
        }


class ToyPromptBank(nn.Module):
    def __init__(self, config: ToyPromptConfig, towers):
        super().__init__()
        self.embeddings = nn.ParameterDict(
            {t.kind: nn.Parameter(torch.randn(config.num_prompt_tokens, t.hidden_size) * 0.02) for t in towers}
        )


class ToyPromptBlock(PromptedBlock):
    def enter(self, run, hidden_states):
        if self.block_index != 0:
            return hidden_states
        banks, kind = self._tuner.banks, self.tower.kind
        prompts = run.route.gather(lambda name: banks[name].embeddings[kind]).to(hidden_states.dtype)
        return insert_tokens(hidden_states, prompts, run.at)

    def leave(self, run, block_input, block_output):
        return remove_tokens(block_output, run.at, run.count) if self.is_last_block else block_output


class ToyPromptModel(PromptTunerModel):
    prefix = "toy_prompt_"
    tuner_layer_cls = ToyPromptBlock

    def _create_bank(self, adapter_name, config, towers):
        return ToyPromptBank(config, towers)


def _toy_config(model, *, num_prompt_tokens: int, head_modules, **overrides) -> ToyPromptConfig:
    return ToyPromptConfig(
        num_prompt_tokens=num_prompt_tokens, modules_to_save=list(head_modules) or None, **overrides
    )


@pytest.fixture(scope="module", autouse=True)
def toy_method():
    """The toy method's one registration line, held for this module only: other test modules (the recipes list
    every registered variant) never see it."""
    register(MethodSpec(name="toy_prompt", peft_type="TOY_PROMPT", config_cls=ToyPromptConfig, model_cls=ToyPromptModel, title="Toy Prompt Tuning", paper_title="A toy method (this test)", paper_url="https://example.org/toy", summary=lambda config: f"{config.num_prompt_tokens} toy prompt tokens before the first block", card_usage="print(model.base_model.toy_prompt_bank)  # the toy prompts", flops=None, variants=(TrainingVariant(name="toy", title="toy prompts", trains="adapter", optimizer="adamw", learning_rate=1e-3, weight_decay=0.0, defaults_source="tests/core/test_registry.py (not measured)", build_config=_toy_config),)))  # fmt: skip
    yield method_spec("toy_prompt")
    unregister("toy_prompt")


def _vit(num_labels: int = 3) -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    return tiny_vit(num_labels=num_labels, num_hidden_layers=2).eval()


# ---------------------------------------------------------------------------------------------------------------
# the toy method, end to end, through what the registry hands out
# ---------------------------------------------------------------------------------------------------------------
def test_toy_method_trains_saves_and_loads_through_its_variant(tmp_path):
    variant = training_variant("toy")
    assert variant.method == "toy_prompt" and variant.config_cls is ToyPromptConfig
    config = variant.build_config(_vit(), num_prompt_tokens=3, head_modules=["classifier"])
    assert isinstance(config, ToyPromptConfig) and config.modules_to_save == ["classifier"]

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base_logits = _vit()(pixel_values=pixels).logits
    model = get_peft_model(_vit(), config)
    logits = model(pixel_values=pixels).logits
    assert logits.shape == base_logits.shape and not torch.allclose(logits, base_logits)  # the prompts act
    model.save_pretrained(tmp_path / "toy")
    assert PeftConfig.from_pretrained(tmp_path / "toy").peft_type == "TOY_PROMPT"  # PEFT knows it
    loaded = PeftModel.from_pretrained(_vit(), tmp_path / "toy").eval()
    torch.testing.assert_close(loaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


def test_toy_method_gets_a_card(tmp_path):
    model = get_peft_model(_vit(), ToyPromptConfig(num_prompt_tokens=3, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "toy")
    card = (tmp_path / "toy" / "README.md").read_text()
    assert "A **Toy Prompt Tuning** adapter ([A toy method (this test)](https://example.org/toy))" in card
    assert "adds 3 toy prompt tokens before the first block." in card
    assert "- toy-prompt\n" in card.split("---\n")[1]  # the method tag, from the peft_type
    assert "import hf_vpt  # registers the hf_vpt methods" in card  # an hf_vpt method, not a PEFT baseline
    assert "print(model.base_model.toy_prompt_bank)  # the toy prompts\n```" in card  # its own usage line


def test_toy_method_without_flop_formula_gets_a_clear_error():
    model, config = _vit(), ToyPromptConfig()
    with pytest.raises(TypeError, match=r"No FLOP formula for Toy Prompt Tuning \(ToyPromptConfig\)") as caught:
        extra_forward_flops(model, config, seq_len=17)
    assert "VisualPromptConfig" in str(caught.value) and "ApproxPromptConfig" in str(caught.value)  # which have one


# ---------------------------------------------------------------------------------------------------------------
# the registry itself
# ---------------------------------------------------------------------------------------------------------------
def test_methods_are_found_by_name_type_and_config():
    names = [spec.name for spec in registered_methods()]
    for name in ("visual_prompt", "gated_prompt", "approx_prompt", "generative_prompt", "lora"):
        assert names.count(name) == 1
    assert method_spec("VISUAL_PROMPT") is method_spec("visual_prompt")
    assert method_spec(hf_vpt.GatedPromptConfig()).name == "gated_prompt"  # the subclass, not VPT it derives from
    assert method_spec(hf_vpt.VisualPromptConfig).name == "visual_prompt"
    assert method_spec(LoraConfig()).peft_builtin
    with pytest.raises(ValueError, match="No registered method for 'IA3'.*visual_prompt \\(VISUAL_PROMPT\\)"):
        method_spec("IA3")


def test_training_variants_cover_the_methods_and_baselines():
    names = [variant.name for variant in training_variants()]
    assert len(names) == len(set(names))
    assert {"vpt_shallow", "vpt_deep", "gated", "apt", "generative", "linear", "lora", "full"} <= set(names)
    with pytest.raises(ValueError, match="Unknown training variant 'vpt'; choose one of: vpt_shallow, vpt_deep"):
        training_variant("vpt")
    assert training_variant("linear").trains == "head" and training_variant("linear").build_config is None
    assert training_variant("full").trains == "all"
    assert training_variant("vpt_deep").accepts("readout") and not training_variant("apt").accepts("readout")


def test_variants_are_offered_by_the_tasks_they_declare():
    """The recipes' `--method` choices come from the variants' declared tasks, not from lists in the recipes."""

    def names(task):
        return {variant.name for variant in training_variants(task)}

    assert names("vision-language") == names("text-to-image") == {"vpt_deep", "apt"}
    assert names("class-conditional-generation") == {"generative"}
    assert {"vpt_shallow", "vpt_deep", "gated", "apt", "linear", "lora", "full"} <= names("image-classification")
    assert "generative" not in names("image-classification")
    with pytest.raises(ValueError, match="Unknown task 'segmentation'; choose one of: image-classification"):
        training_variants("segmentation")
    for bad in ((), ("segmentation",), "vision-language"):
        with pytest.raises(ValueError, match="`tasks` must be a non-empty tuple of"):
            TrainingVariant(
                name="x", title="x", trains="head", optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
                defaults_source="test", build_config=None, tasks=bad,
            )  # fmt: skip


def test_variant_configs_are_the_methods_configs():
    model = _vit()
    shallow = training_variant("vpt_shallow").build_config(model, num_prompt_tokens=5, head_modules=["classifier"])
    assert (type(shallow), shallow.depth, shallow.num_prompt_tokens) == (hf_vpt.VisualPromptConfig, "shallow", 5)
    deep = training_variant("vpt_deep").build_config(
        model, num_prompt_tokens=4, head_modules=[], readout="mean_unit_norm"
    )
    assert (deep.depth, deep.readout, deep.modules_to_save) == ("deep", "mean_unit_norm", None)
    apt = training_variant("apt").build_config(model, num_prompt_tokens=4, head_modules=["classifier"], rank=2)
    assert (type(apt), apt.rank) == (hf_vpt.ApproxPromptConfig, 2)
    generative = training_variant("generative").build_config(
        model, num_prompt_tokens=8, head_modules=[], num_classes=3
    )
    assert (type(generative), generative.num_classes) == (hf_vpt.GenerativePromptConfig, 3)
    # LoRA's targets are found by structure: the q/v projections of every block, here by their shared leaf names
    lora = training_variant("lora").build_config(model, num_prompt_tokens=4, head_modules=["classifier"], r=4)
    expected = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj"))}
    assert isinstance(lora, LoraConfig) and set(lora.target_modules) == expected == {"q_proj", "v_proj"}
    assert lora.r == 4 and lora.modules_to_save == ["classifier"]


def test_a_variant_name_belongs_to_one_method():
    clash = TrainingVariant(
        name="vpt_deep", title="x", trains="adapter", optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
        defaults_source="test", build_config=_toy_config,
    )  # fmt: skip
    spec = method_spec("toy_prompt")
    with pytest.raises(ValueError, match="'vpt_deep' is already declared by visual_prompt"):
        register(MethodSpec(**{**spec.__dict__, "variants": (clash,)}))
    assert training_variant("toy").method == "toy_prompt"  # the refused registration changed nothing
    with pytest.raises(ValueError, match="needs a `build_config`"):
        TrainingVariant(
            name="x", title="x", trains="adapter", optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
            defaults_source="test", build_config=None,
        )  # fmt: skip


def _code_strings_and_names(path: Path) -> set[str]:
    """String constants (docstrings aside) and identifiers used in a module's code."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.add(node.value)
        elif isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
    return found


@pytest.mark.parametrize("module", ["hub.py", "flops.py"])
def test_hub_and_flops_name_no_method(module):
    """hub.py and flops.py read everything method-specific from the registry: no peft_type string, no config
    class, no variant name of any registered method appears in their code."""
    used = _code_strings_and_names(PACKAGE / module)
    for spec in registered_methods():
        named = {spec.peft_type, spec.config_cls.__name__, spec.model_cls.__name__, *(v.name for v in spec.variants)}
        assert not (named & used), f"{module} names {sorted(named & used)} of {spec.name}"


def test_card_data_of_builtin_methods_comes_from_their_folders():
    card = hf_vpt.hub.render_model_card(hf_vpt.ApproxPromptConfig(num_prompt_tokens=7, rank=3), task="generic")
    assert "Approximated Prompt Tuning for Vision-Language Pre-trained Models (Wu et al., ICCV 2023)" in card
    assert "7 prompts and a rank-3 key map per layer" in card
    gated = hf_vpt.hub.render_model_card(hf_vpt.GatedPromptConfig(), task="image-classification", num_labels=2)
    assert "print(hf_vpt.gate_values(model))" in gated  # the method's own usage line
    lora = hf_vpt.hub.render_model_card(LoraConfig(r=8, target_modules=["q_proj"]), task="generic")
    assert "rank-8 updates" in lora and "LoRA is PEFT's own method" in lora
    assert json.loads(json.dumps(training_variant("lora").defaults_source))  # a plain one-line string


# ---------------------------------------------------------------------------------------------------------------
# the package surface: `hf_vpt.metrics` on first use, not at import
# ---------------------------------------------------------------------------------------------------------------
def test_metrics_are_reachable_after_import_hf_vpt_but_load_lazily():
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import hf_vpt\n"
        "print('eager:', [m for m in ('hf_vpt.metrics', 'hf_vpt.metrics.inception', 'evaluate') if m in sys.modules])\n"
        "import torch\n"
        "cov = torch.eye(3)\n"
        "print('same:', hf_vpt.metrics.frechet_distance(torch.zeros(3), cov, torch.zeros(3), cov))\n"
        "print('shifted:', hf_vpt.metrics.frechet_distance(torch.zeros(3), cov, torch.tensor([1.0, 2.0, 2.0]), cov))\n"
        "print('sampling:', callable(hf_vpt.sampling.maskgit_sample))\n"
        "try:\n"
        "    hf_vpt.no_such_thing\n"
        "except AttributeError as exc:\n"
        "    print('missing:', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = result.stdout
    assert "eager: []" in out, out + result.stderr  # importing hf_vpt loads no metric module
    assert "same: 0.0" in out and "shifted: 9.0" in out  # |Δμ|² = 1 + 4 + 4 with equal covariances
    assert "sampling: True" in out and "missing: module 'hf_vpt' has no attribute 'no_such_thing'" in out


def test_unregister_forgets_a_method(toy_method):
    spare = register(
        MethodSpec(**{**toy_method.__dict__, "name": "spare_prompt", "peft_type": "SPARE_PROMPT", "variants": ()})
    )
    assert spare == "SPARE_PROMPT" and method_spec("spare_prompt").model_cls is ToyPromptModel
    unregister("spare_prompt")
    assert "spare_prompt" not in [spec.name for spec in registered_methods()]
    with pytest.raises(ValueError, match="No registered method for 'spare_prompt'"):
        method_spec("spare_prompt")
    with pytest.raises(ValueError, match="No registered method 'spare_prompt'"):
        unregister("spare_prompt")
