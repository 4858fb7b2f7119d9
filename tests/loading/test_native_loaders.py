"""Loading an hf_vpt adapter the transformers way (`AutoModel*.from_pretrained(adapter_dir)`, `pipeline(model=...)`)
gets a true message pointing to `PeftModel.from_pretrained`, the advice in it works, PEFT's own adapters still load
natively, and a folder opened without `import hf_vpt` says (in the files hf_vpt writes) what to import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image

import hf_vpt
from hf_vpt.core.config import AdapterLoadError
from hf_vpt.testing_utils import tiny_vit


@pytest.fixture
def saved(tmp_path):
    """A local base checkpoint (with its image processor) and a VPT adapter saved from it."""
    base_dir, adapter_dir = tmp_path / "tiny-vit", tmp_path / "adapter"
    torch.manual_seed(0)
    tiny_vit(num_labels=4, num_hidden_layers=2).save_pretrained(base_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(base_dir)
    base = transformers.ViTForImageClassification.from_pretrained(base_dir)
    model = get_peft_model(base, hf_vpt.VisualPromptConfig(num_prompt_tokens=2, modules_to_save=["classifier"]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def test_auto_model_from_adapter_dir_points_to_peft(saved):
    base_dir, adapter_dir = saved
    with pytest.raises(AdapterLoadError) as caught:
        transformers.AutoModelForImageClassification.from_pretrained(adapter_dir)
    message = str(caught.value)
    assert "hf_vpt Visual Prompt Tuning adapter" in message and "get_peft_model" not in message
    assert f"PeftModel.from_pretrained(base, {str(adapter_dir)!r})" in message
    assert f"ViTForImageClassification.from_pretrained({str(base_dir)!r})" in message  # the real base, found


def test_pipeline_from_adapter_dir_points_to_peft_and_the_advice_works(saved):
    base_dir, adapter_dir = saved
    with pytest.raises(ValueError, match=r"PeftModel\.from_pretrained\(base"):
        transformers.pipeline("image-classification", model=str(adapter_dir))

    # What the message says to do: load with PEFT and give the pipeline the loaded model.
    base = transformers.ViTForImageClassification.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(base_dir)
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    top = classify(image, top_k=1)[0]
    with torch.no_grad():
        probabilities = model(**processor(images=image, return_tensors="pt")).logits.softmax(-1)[0]
    assert top["label"] == model.config.id2label[int(probabilities.argmax())]
    assert top["score"] == pytest.approx(float(probabilities.max()), rel=1e-5)


def test_peft_builtin_adapters_still_load_natively(tmp_path):
    """The guard is for hf_vpt's methods only: a LoRA adapter keeps transformers' own loading."""
    base_dir, adapter_dir = tmp_path / "tiny-vit", tmp_path / "lora"
    tiny_vit(num_labels=4, num_hidden_layers=2).save_pretrained(base_dir)
    base = transformers.ViTForImageClassification.from_pretrained(base_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter_dir)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(adapter_dir)
    assert any("lora_A" in name for name, _ in loaded.named_parameters())


def test_without_import_hf_vpt_the_folder_says_what_to_import(saved):
    """PEFT alone cannot know the method and hf_vpt's code does not run; what it can reach says to import it."""
    _, adapter_dir = saved
    note = json.loads((adapter_dir / hf_vpt.hub.CARD_DATA_FILE).read_text())[hf_vpt.hub.LOAD_NOTE_KEY]
    assert "import hf_vpt" in note
    assert (adapter_dir / "README.md").read_text().count("import hf_vpt") >= 1

    code = (
        "import sys, transformers\n"
        "from peft import PeftModel\n"
        f"base = transformers.ViTForImageClassification.from_pretrained({str(saved[0])!r})\n"
        "try:\n"
        f"    PeftModel.from_pretrained(base, {str(adapter_dir)!r})\n"
        "except KeyError as exc:\n"
        "    print('KeyError', exc)\n"
        "print('hf_vpt imported:', 'hf_vpt' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    # PEFT's own KeyError: nothing of hf_vpt runs before `import hf_vpt`, which is why the folder carries the note
    assert "KeyError 'VISUAL_PROMPT'" in result.stdout and "hf_vpt imported: False" in result.stdout
