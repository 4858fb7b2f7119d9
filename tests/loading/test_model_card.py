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
from hf_vpt.testing_utils import tiny_imagegpt, tiny_vit


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
    tiny_vit(num_labels=2, num_hidden_layers=2).save_pretrained(checkpoint)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    base = transformers.ViTForImageClassification.from_pretrained(checkpoint)
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]))
    model.save_pretrained(adapter)
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "hf_vpt_card.json",
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
    torch.manual_seed(0)
    tiny_imagegpt(codebook_size=8, grid=4).save_pretrained(checkpoint)  # 9 ids (SOS = 8), 17 positions
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


# ---------------------------------------------------------------------------------------------------------------
# cards from the model: the snippet runs as written after `save_pretrained` and `Trainer.save_model`
# ---------------------------------------------------------------------------------------------------------------
LABELS = [f"kind{i}" for i in range(10)]


def _new_head_model(tmp_path):
    """What a new user does: a local 3-class checkpoint, loaded with a new 10-class head that the adapter trains."""
    checkpoint = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    tiny_vit(num_labels=3, num_hidden_layers=2).save_pretrained(checkpoint)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    base = transformers.AutoModelForImageClassification.from_pretrained(
        checkpoint, id2label=dict(enumerate(LABELS)), ignore_mismatched_sizes=True
    )
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]))
    with torch.no_grad():  # "training": the saved prompts and head differ from any fresh initialisation
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    return model.eval()


def _card_logits(folder, tmp_path, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Run the card's snippet as written (from the folder the user saved in); return its logits, the logits of
    the same image through the processor, and what it printed."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save("image.jpg")
    namespace = {"__name__": "card"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_snippet((folder / "README.md").read_text()), "<model card>", "exec"), namespace)
    pixels = namespace["processor"](images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")
    return namespace["logits"], pixels["pixel_values"], out.getvalue().strip()


def test_card_snippet_runs_after_save_pretrained_with_a_new_head(tmp_path, monkeypatch):
    model = _new_head_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("adapter")  # a relative folder, as users write it
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| trained head | `classifier` (10 labels) |" in card
    assert f"from_pretrained({json.dumps(str(tmp_path / 'tiny-vit'))})" in _snippet(card)  # the local base model
    assert "huggingface.co/" not in card.split("## Use it")[0] and "base_model:" not in card.split("---\n")[1]

    logits, pixel_values, printed = _card_logits(tmp_path / "adapter", tmp_path, monkeypatch)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    assert logits.shape == (1, 10)
    torch.testing.assert_close(logits, expected)  # the trained prompts and head came back, not a fresh head
    assert printed == LABELS[int(expected.argmax())]


def _trainer(model, output_dir, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), report_to=[], use_cpu=True, per_device_train_batch_size=2, **kwargs
    )
    return transformers.Trainer(model=model, args=args)


def test_card_snippet_runs_after_trainer_save_model(tmp_path, monkeypatch):
    model = _new_head_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    _trainer(model, "out").save_model("out")
    logits, pixel_values, printed = _card_logits(tmp_path / "out", tmp_path, monkeypatch)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, expected)
    assert printed == LABELS[int(expected.argmax())]


class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": index % 10}


def test_trainer_card_keeps_hf_vpt_content(tmp_path, monkeypatch):
    """`trainer.push_to_hub()` = save_model + `create_model_card()` + upload: the card it uploads must keep the
    import line, the tags and the snippet, and gain the Trainer's results (offline: no upload)."""
    model = _new_head_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    trainer = _trainer(model, "out", max_steps=1, eval_strategy="no")
    trainer.train_dataset, trainer.eval_dataset = _Pairs(), _Pairs()
    trainer.compute_metrics = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.save_model("out")
    trainer.create_model_card(dataset_tags="beans", dataset="beans", tasks="image-classification", tags=["my-run"])

    card = (tmp_path / "out" / "README.md").read_text()
    front_matter = card.split("---\n")[1]
    assert hf_vpt.hub.CARD_MARKER in card and "Trainer had access to" not in card
    assert "import hf_vpt  #" in _snippet(card)
    for tag in ("hf_vpt", "visual-prompt", "my-run"):
        assert f"- {tag}\n" in front_matter
    assert "model-index:" in front_matter and "type: accuracy" in front_matter  # the Trainer's eval result
    assert f"value: {accuracy}" in front_matter and "type: beans" in front_matter
    assert "## Trainer" in card and "\n#### Training hyperparameters\n" in card  # its sections, one level down
    assert "More information needed" not in card  # the draft's placeholders are left out
    # the merged card survives the next save, and its snippet still loads the adapter
    model.save_pretrained("out")
    assert "### Training hyperparameters" in (tmp_path / "out" / "README.md").read_text()
    logits, pixel_values, _ = _card_logits(tmp_path / "out", tmp_path, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixel_values=pixel_values).logits)


def test_dataset_and_metrics_metadata(tmp_path):
    config = hf_vpt.VisualPromptConfig(base_model_name_or_path="google/vit-base-patch16-224")
    card = render_model_card(
        config, base_model_class="ViTForImageClassification", dataset="uoft-cs/cifar10", metrics={"accuracy": 0.91}
    )
    front_matter = card.split("---\n")[1]
    assert "datasets:\n- uoft-cs/cifar10\n" in front_matter
    assert "model-index:" in front_matter and "type: accuracy" in front_matter and "value: 0.91" in front_matter
    assert "type: uoft-cs/cifar10" in front_matter

    for dataset in ("/data/my images", "sklearn digits (8x8, classes 5-9)", "./imagefolder"):
        card = render_model_card(
            config, base_model_class="ViTForImageClassification", dataset=dataset, metrics={"accuracy": 0.5}
        )
        front_matter = card.split("---\n")[1]
        assert "datasets:" not in front_matter and f"Dataset: `{dataset}`" in card
        assert "type: custom" in front_matter  # the result is still in model-index, under a non-Hub dataset


def test_card_data_file_tells_how_to_load(tmp_path):
    model = _new_head_model(tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / hf_vpt.hub.CARD_DATA_FILE).read_text())
    assert "import hf_vpt" in data[hf_vpt.hub.LOAD_NOTE_KEY] and "PeftModel.from_pretrained" in data["how_to_load"]
    assert hf_vpt.hub.read_card_data(tmp_path / "adapter") == {}  # the note is never card data


def test_card_snippet_runs_after_a_recipe_style_save(tmp_path, monkeypatch):
    """What the recipes do: `save_pretrained`, then `write_model_card(folder, config, model=..., <training details>)`
    (hf_vpt.hub); the card keeps the model's head and labels and gains the details, and its snippet still runs."""
    model = _new_head_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("run")
    write_model_card(
        "run",
        model.peft_config["default"],
        model=model,
        dataset="beans",
        metrics={"accuracy": 0.75, "epochs": 3},
        command="python recipes/image_classification.py --method vpt_deep",
        trainable_parameters="1,234",
    )
    card = (tmp_path / "run" / "README.md").read_text()
    front_matter = card.split("---\n")[1]
    assert "datasets:\n- beans\n" in front_matter and "value: 0.75" in front_matter
    assert "| trained head | `classifier` (10 labels) |" in card and "python recipes/image_classification.py" in card
    logits, pixel_values, printed = _card_logits(tmp_path / "run", tmp_path, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixel_values=pixel_values).logits)
    assert printed in LABELS


def test_a_resave_of_another_model_shows_its_own_labels_not_the_stored_ones(tmp_path):
    """Training details given once are kept on re-save; what the model says about itself (head, labels) is read
    fresh every time, so saving a 2-label model where a 3-label one was saved does not keep the old labels."""
    config = hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"])
    names = ["ant", "bee", "cow"]
    torch.manual_seed(0)
    first = get_peft_model(
        tiny_vit(num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}), config
    )
    first.save_pretrained(tmp_path)
    write_model_card(tmp_path, first.peft_config["default"], model=first, dataset="zoo", labels=names, num_labels=3)
    stored = json.loads((tmp_path / "hf_vpt_card.json").read_text())
    assert stored["dataset"] == "zoo" and "labels" not in stored and "num_labels" not in stored

    second = get_peft_model(
        tiny_vit(num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1}),
        hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]),
    )
    second.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "`classifier` (2 labels)" in card and "cow" not in card
    assert "zoo" in card  # the training details stay


def test_recipe_save_keeps_a_users_own_readme(tmp_path):
    """`recipes/_common.save_adapter` (save_pretrained, then the card with training details) leaves a README.md
    that the user wrote in the folder alone, as save_pretrained itself does."""
    import sys
    from pathlib import Path

    from accelerate import Accelerator

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    import _common

    (tmp_path / "README.md").write_text("# my own notes\n")
    torch.manual_seed(0)
    model = get_peft_model(tiny_vit(num_labels=3), hf_vpt.VisualPromptConfig(num_prompt_tokens=2))
    _common.save_adapter(
        Accelerator(cpu=True),
        model,
        str(tmp_path),
        dataset="zoo",
        metrics={"accuracy": 0.5},
        command="python x.py",
        trainable="1 of 2",
    )
    card = (tmp_path / "README.md").read_text()  # PEFT adds its metadata to any card, as for every adapter
    assert "# my own notes" in card and "import hf_vpt" not in card
    assert (tmp_path / "adapter_model.safetensors").is_file()
