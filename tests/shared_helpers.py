"""Helpers shared by test modules in different folders (tests/ is on `sys.path` through its conftest.py).

The tiny models themselves are in `hf_vpt.testing_utils`; what lives here reaches into upstream internals (the
references decompose an untouched model by its attribute names), which `hf_vpt/` itself may only do through
`hf_vpt._compat`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


TINY_IMAGE_LABELS = ("dark", "light")


def blocks_and_parts(name, model):
    """(embed(inputs) -> sequence, blocks, finish(sequence) -> main output) of an untouched model."""
    if name == "vit":
        vit = model.vit
        return (
            lambda inp: vit.embeddings(inp["pixel_values"]),
            vit.layers,
            lambda h: model.classifier(vit.layernorm(h)[:, 0]),
        )
    if name == "deit":
        deit = model.deit

        def finish(h):
            s = deit.layernorm(h)
            return (model.cls_classifier(s[:, 0]) + model.distillation_classifier(s[:, 1])) / 2

        return lambda inp: deit.embeddings(inp["pixel_values"]), deit.layers, finish
    if name == "vit_mae":
        return (
            lambda inp: model.embeddings(inp["pixel_values"], noise=inp["noise"])[0],
            model.layers,
            lambda h: model.layernorm(h),
        )
    if name == "dinov2":
        dino = model.dinov2

        def finish(h):
            s = dino.layernorm(h)
            return model.classifier(torch.cat([s[:, 0], s[:, 1:].mean(dim=1)], dim=1))

        return lambda inp: dino.embeddings(inp["pixel_values"]), dino.encoder.layer, finish
    if name == "dinov2_registers":

        def finish(h):
            s = model.layernorm(h)
            return torch.cat([s[:, 0].flatten(1), s.flatten(1)], dim=1)

        return lambda inp: model.embeddings(inp["pixel_values"]), model.encoder.layer, finish
    if name == "clip_vision":

        def finish(h):
            return torch.cat([model.post_layernorm(h[:, 0]).flatten(1), h.flatten(1)], dim=1)

        return lambda inp: model.pre_layrnorm(model.embeddings(inp["pixel_values"])), model.encoder.layers, finish
    if name == "clip":
        vision = model.vision_model

        def finish_with(inp):
            def finish(h):
                image = model.visual_projection(vision.post_layernorm(h[:, 0]))
                text = model.text_projection(model.text_model(input_ids=inp["input_ids"]).pooler_output)
                image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
                return model.logit_scale.exp() * image @ text.t()

            return finish

        return (
            lambda inp: vision.pre_layrnorm(vision.embeddings(inp["pixel_values"])),
            vision.encoder.layers,
            finish_with,
        )
    if name == "siglip_vision":

        def finish(h):
            s = model.post_layernorm(h)
            return torch.cat([model.head(s).flatten(1), s.flatten(1)], dim=1)

        return lambda inp: model.embeddings(inp["pixel_values"]), model.encoder.layers, finish
    raise KeyError(name)


def distributed_run_env(cpu: bool = True, **extra: str) -> dict:
    """The environment of a multi-process launch of the repository's code (`torch.distributed.run`, `accelerate
    launch`): offline, one thread per process, the repository on the path, float32 matmuls on GPUs (no TF32, for
    1e-5 comparisons), and with `cpu` accelerate kept on the CPU."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")])),
        NVIDIA_TF32_OVERRIDE="0",
        **extra,
    )
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def deepspeed_import_error() -> str | None:
    """Why DeepSpeed cannot be used here (the last line of `import deepspeed`'s error), or None. Imported in a child
    process: the import probes accelerators."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["(no message)"])[-1]


def write_tiny_vit_and_images(root: Path, splits: dict) -> Path:
    """A tiny ViT checkpoint with its image processor in `root/tiny-vit`, and two-class imagefolders
    (`splits`: split name -> images per class) of noisy dark and light 20x20 images."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    checkpoint = root / "tiny-vit"
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=7,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(checkpoint)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        for name, level in zip(TINY_IMAGE_LABELS, (40, 200)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 20, size=(20, 20, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------
# the generative digits studies (examples/generative_digits/run.py: ImageGPT; examples/maskgit_digits/run.py: MaskGIT)
# ---------------------------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATIVE_STUDY_ROWS = ["no_adaptation", "generative_prompt", "full_finetune", "guidance_2", "real"]


def load_example(relative_path: str, module_name: str):
    """Import an example script (e.g. `examples/maskgit_digits/run.py`) as a module, by its path in the repository."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reduced_generative_argv(width_option: str, width: int, prompts: int, per_class: int, columns: int, levels: int):
    """The options both generative studies' tests run with: `--quick`, a given generator width (`--n_embd` or
    `--hidden_size`), prompt length, samples per class, grid columns and levels, guidance g=2, no progress bars."""
    return [
        "--quick",
        f"--{width_option}", str(width),
        "--num_prompt_tokens", str(prompts),
        "--num_levels", str(levels),
        "--samples_per_class", str(per_class),
        "--grid_columns", str(columns),
        "--guidance_scales", "2",
        "--no-progress",
    ]  # fmt: skip


def assert_bad_options_exit(parse_args, cases, capsys) -> None:
    """Each `(argv, text)` of `cases` makes `parse_args(argv)` exit with `text` in its error message."""
    import pytest

    for argv, text in cases:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert text in capsys.readouterr().err, argv


def check_generative_study_outputs(out: Path, columns: int) -> dict:
    """What both generative studies write: results.json with the five rows (each in the table, fidelity in [0, 1],
    a finite Fréchet distance), a `samples_<row>.png` grid per row (rows = classes 5-9, 8x8 digits at 4x with 1 px
    gaps), samples.png side by side and the first seed's prompt adapter with its card. Returns results.json."""
    import json
    import math

    from PIL import Image

    data = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in data["results"]}
    assert list(rows) == GENERATIVE_STUDY_ROWS
    for name, row in rows.items():
        assert Image.open(out / f"samples_{name}.png").size == (columns * 33 + 1, 5 * 33 + 1)
        assert row["title"] in data["table"]
        assert 0.0 <= row["class_fidelity_mean"] <= 1.0
        assert math.isfinite(row["frechet_distance_mean"]) and row["frechet_distance_mean"] >= 0.0
        if name != "real":
            assert len(row["per_seed"]) == len(data["seeds"])
            assert set(row["class_fidelity_per_class_mean"]) == {"5", "6", "7", "8", "9"}
    assert Image.open(out / "samples.png").size[0] > 5 * columns * 33
    assert data["classifier"]["heldout_accuracy"] == rows["real"]["class_fidelity_mean"]
    adapter = Path(data["adapter_path"])
    assert adapter == out / "generative_prompt_adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (adapter / name).is_file()
    assert "Generative Visual Prompt Tuning" in (adapter / "README.md").read_text()
    return data


def assert_cached_by_pretrain_cache(generator: dict, cache_dir: Path, name: str) -> None:
    """The study's pretrained generator sits where `examples/digits_transfer/pretrain_cache.py` puts it: the folder
    named by the hash of the recorded settings, with its pretraining.json."""
    cache = load_example("examples/digits_transfer/pretrain_cache.py", "pretrain_cache_for_tests")
    assert generator["path"] == cache.cache_folder(str(cache_dir), name, generator["settings"])
    assert (Path(generator["path"]) / cache.INFO_FILE).is_file()
