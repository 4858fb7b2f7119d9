"""The "Use it" snippet of the model card: it starts with `import hf_vpt`, fits the task of the adapter's base
model, is valid Python, and (for image classification and ImageGPT sampling) runs as written on a local tiny
checkpoint."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from PIL import Image

import hf_vpt
from hf_vpt.hub import TASKS, card_task, render_model_card, write_model_card


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def _snippet(card: str) -> str:
    match = re.search(r"## Use it\n\n```python\n(.*?)```", card, re.S)
    assert match, "no python block under '## Use it'"
    return match.group(1)


def _parsed(card: str) -> tuple[str, set[str], set[str]]:
    """The snippet, the names it imports (`module.name`) and the functions/methods it calls."""
    snippet = _snippet(card)
    assert snippet.startswith("import hf_vpt  #")
    tree = ast.parse(snippet)
    imports, calls = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            calls.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return snippet, imports, calls


@pytest.mark.parametrize(
    ("base_class", "task"),
    [
        ("ViTForImageClassification", "image-classification"),
        ("Dinov2ForImageClassification", "image-classification"),
        ("ImageGPTForImageClassification", "image-classification"),
        ("ViltForQuestionAnswering", "vision-language"),
        ("ViltForImagesAndTextClassification", "vision-language"),
        ("UVit2DModel", "masked-token-generation"),
        ("ImageGPTForCausalImageModeling", "autoregressive-generation"),
        ("CLIPTextModel", "text-to-image"),
        ("CLIPModel", "generic"),
        (None, "generic"),
    ],
)
def test_task_follows_the_base_class(base_class, task):
    assert card_task("VISUAL_PROMPT", base_class) == task


def test_snippets_per_task_are_valid_python_and_task_specific():
    vpt = hf_vpt.VisualPromptConfig(num_prompt_tokens=4, depth="deep", base_model_name_or_path="org/vit")
    _, imports, calls = _parsed(
        render_model_card(vpt, base_model_class="ViTForImageClassification", num_labels=2, labels=["cat", "dog"])
    )
    assert {"transformers.AutoModelForImageClassification", "transformers.AutoImageProcessor"} <= imports
    assert {"from_pretrained", "processor", "argmax"} <= calls

    apt = hf_vpt.ApproxPromptConfig(base_model_name_or_path="dandelin/vilt-b32-mlm")
    card = render_model_card(apt, base_model_class="ViltForQuestionAnswering", num_labels=3129)
    snippet, imports, calls = _parsed(card)
    assert {"transformers.ViltProcessor", "transformers.ViltForQuestionAnswering"} <= imports
    assert "pipeline_tag: visual-question-answering" in card and "num_labels=3129" in snippet
    snippet, imports, _ = _parsed(render_model_card(apt, base_model_class="ViltForImagesAndTextClassification"))
    assert "transformers.ViltForImagesAndTextClassification" in imports and "unsqueeze(0)" in snippet

    generative = hf_vpt.GenerativePromptConfig(num_classes=3, base_model_name_or_path="amused/amused-256")
    snippet, imports, calls = _parsed(render_model_card(generative, base_model_class="UVit2DModel"))
    assert {"diffusers.UVit2DModel", "hf_vpt.sampling.maskgit_sample"} <= imports and "maskgit_sample" in calls
    assert "torch.arange(3)" in snippet
    _, imports, calls = _parsed(render_model_card(generative, base_model_class="ImageGPTForCausalImageModeling"))
    assert "hf_vpt.sampling.autoregressive_sample" in imports and "imagegpt_tokens_to_images" in calls

    # SDXL's second text encoder, recorded as <pipeline>/text_encoder_2: the pipeline and the component come back.
    encoder = hf_vpt.VisualPromptConfig(depth="deep", base_model_name_or_path="org/sdxl/text_encoder_2")
    card = render_model_card(encoder, base_model_class="CLIPTextModelWithProjection")
    snippet, imports, calls = _parsed(card)
    assert "diffusers.DiffusionPipeline" in imports and "load_text_encoder_adapter" in calls
    assert 'from_pretrained("org/sdxl")' in snippet and 'component="text_encoder_2"' in snippet
    assert "pipeline_tag: text-to-image" in card

    # Unknown classes load with their own class; names that need escaping stay valid Python.
    odd = hf_vpt.GatedPromptConfig(base_model_name_or_path='a "quoted" \\ path')
    snippet, imports, _ = _parsed(render_model_card(odd, base_model_class="CLIPModel"))
    assert "transformers.CLIPModel" in imports and 'CLIPModel.from_pretrained("a \\"quoted\\" \\\\ path")' in snippet

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], base_model_name_or_path="org/vit")
    card = render_model_card(lora, task="image-classification", num_labels=5)
    _, imports, _ = _parsed(card)
    assert "transformers.AutoModelForImageClassification" in imports
    assert "| target_modules | `['q_proj', 'v_proj']` |" in card and "LoRA is PEFT's own method" in card


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="Unknown model-card task 'segmentation'"):
        render_model_card(hf_vpt.VisualPromptConfig(), task="segmentation")
    assert "generic" in TASKS


def _run_snippet(snippet: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "<model card>", "exec"), {"__name__": "card"})
    return out.getvalue()


def test_image_classification_card_runs_as_written(tmp_path, monkeypatch):
    checkpoint, adapter = tmp_path / "tiny-vit", tmp_path / "adapter"
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_labels=2, **SMALL)
    transformers.ViTForImageClassification(config).save_pretrained(checkpoint)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    base = transformers.ViTForImageClassification.from_pretrained(checkpoint)
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]))
    model.save_pretrained(adapter)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # save_pretrained alone already picks the task from the class PEFT records in adapter_config.json
    assert json.loads((adapter / "adapter_config.json").read_text())["auto_mapping"]["base_model_class"] == (
        "ViTForImageClassification"
    )
    assert "AutoModelForImageClassification" in _snippet((adapter / "README.md").read_text())
    write_model_card(adapter, model.peft_config["default"], repo_id=str(adapter), num_labels=2, labels=["no", "yes"])

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(tmp_path / "image.jpg")
    printed = _run_snippet(_snippet((adapter / "README.md").read_text()))
    assert printed.strip() in ("no", "yes")


def test_imagegpt_card_samples_as_written(tmp_path):
    checkpoint, adapter = tmp_path / "tiny-imagegpt", tmp_path / "adapter"
    config = transformers.ImageGPTConfig(vocab_size=9, n_positions=17, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.ImageGPTForCausalImageModeling(config).save_pretrained(checkpoint)
    palette = np.random.default_rng(0).uniform(-1, 1, size=(9, 3))  # a colour for every id, SOS included
    transformers.ImageGPTImageProcessor(clusters=palette).save_pretrained(checkpoint)
    base = transformers.ImageGPTForCausalImageModeling.from_pretrained(checkpoint)
    model = get_peft_model(base, hf_vpt.GenerativePromptConfig(num_prompt_tokens=2, num_classes=2))
    model.save_pretrained(adapter)
    write_model_card(adapter, model.peft_config["default"], repo_id=str(adapter))

    snippet = _snippet((adapter / "README.md").read_text())
    assert "autoregressive_sample" in snippet
    namespace = {"__name__": "card"}
    exec(compile(snippet, "<model card>", "exec"), namespace)
    assert namespace["images"].shape == (2, 4, 4, 3) and namespace["images"].dtype == np.uint8


@pytest.mark.parametrize(
    "base, on_hub",
    [
        ("google/vit-base-patch16-224", True),
        ("gpt2", True),
        ("/srv/models/digits_vit_1", False),
        ("./vit", False),
    ],
)
def test_only_hub_ids_get_a_hub_link_and_base_model_metadata(base, on_hub):
    card = render_model_card(
        hf_vpt.VisualPromptConfig(base_model_name_or_path=base), base_model_class="ViTForImageClassification"
    )
    front_matter = card.split("---\n")[1]
    assert (f"base_model: {base}\n" in front_matter) is on_hub
    assert (f"https://huggingface.co/{base}" in card) is on_hub
    assert "https://huggingface.co//" not in card
