"""The README's `transformers.Trainer` example runs as written, on a tiny ViT and a tiny image folder.

The code block is read from README.md and executed with two strings substituted: the checkpoint name (a tiny ViT
saved to a temporary folder) and the image folder (a few generated PNGs). If the README's example stops working,
this test fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch


README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Train with `transformers.Trainer`"
CHECKPOINT = "google/vit-base-patch16-224-in21k"
IMAGE_DIR = "path/to/images"


def trainer_example() -> str:
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, f"no python code block under {HEADING!r}"
    code = match.group(1)
    for placeholder in (CHECKPOINT, IMAGE_DIR):
        assert f'"{placeholder}"' in code, f"the example no longer uses {placeholder!r}; update this test"
    return code


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from transformers import ViTImageProcessor

    from hf_vpt.testing_utils import tiny_vit

    torch.manual_seed(0)
    folder = tmp_path / "tiny-vit"
    tiny_vit(num_labels=2).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, brightness in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            pixels = np.clip(rng.normal(brightness, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def test_readme_trainer_example_runs(tmp_path, tiny_checkpoint, image_folder, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    code = trainer_example()
    code = code.replace(f'"{CHECKPOINT}"', repr(str(tiny_checkpoint))).replace(
        f'"{IMAGE_DIR}"', repr(str(image_folder))
    )
    monkeypatch.chdir(tmp_path)  # the example writes to relative paths
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:{HEADING}", "exec"), scope)

    model, trainer = scope["model"], scope["trainer"]
    assert trainer.state.global_step > 0
    base = AutoModelForImageClassification.from_pretrained(tiny_checkpoint)
    initial = {name: p.detach().clone() for name, p in base.named_parameters()}
    # the frozen backbone did not move, the prompts did
    trained = model.get_base_model()
    for name, param in trained.named_parameters():
        if not param.requires_grad and name in initial:
            assert torch.equal(param, initial[name]), name
    saved = [
        p
        for p in os.listdir(tmp_path)
        if os.path.isdir(tmp_path / p) and (tmp_path / p / "adapter_config.json").is_file()
    ]
    assert len(saved) == 1, saved
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageClassification.from_pretrained(tiny_checkpoint, num_labels=2, ignore_mismatched_sizes=True),
        str(tmp_path / saved[0]),
    ).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixels).logits
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, logits)
        assert not torch.allclose(logits, base.eval()(pixel_values=pixels).logits)  # training changed something
    assert (tmp_path / saved[0] / "README.md").is_file()
