"""recipes/image_classification.py end to end on a tiny ViT saved to a folder and a tiny imagefolder: every method,
options from JSON/YAML, bit-exact resume with adapter-only checkpoints, bf16 from the launcher, startup errors."""

import json
import os
import re
import shutil
import sys
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import hf_vpt  # noqa: E402, F401  (registers the methods with PEFT before loading)


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
sys.path.insert(0, str(RECIPES))
import image_classification as recipe  # noqa: E402
from shared_helpers import TINY_IMAGE_LABELS, write_tiny_vit_and_images  # noqa: E402


LABELS = list(TINY_IMAGE_LABELS)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each `recipe.main` in this process starts with accelerate's singletons as a new process has them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_vit_and_images(root, {"train": 5, "val": 3})
    return root


def base_args(tiny: Path, out: Path, *extra) -> list:
    return [
        "--model_name_or_path", str(tiny / "tiny-vit"),
        "--train_dir", str(tiny / "train"),
        "--output_dir", str(out),
        "--num_prompt_tokens", "2",
        "--per_device_train_batch_size", "4",
        "--disable_tqdm",
        *extra,
    ]  # fmt: skip


def fresh_base(tiny: Path):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(
        tiny / "tiny-vit", num_labels=2, ignore_mismatched_sizes=True
    ).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(pixel_values=pixels).logits


@pytest.mark.parametrize("method", recipe.METHODS)
def test_every_method_trains_saves_and_reloads(tiny, tmp_path, method):
    from transformers import AutoModelForImageClassification

    out = tmp_path / method
    done = recipe.main(base_args(tiny, out, "--method", method, "--validation_dir", str(tiny / "val"),
                                 "--max_train_steps", "2"))  # fmt: skip
    assert done["finished"] and done["steps"] == 2 and done["method"] == method
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["train_steps"] == 2
    variant = hf_vpt.registry.training_variant(method)
    assert (results["optimizer"], results["learning_rate"]) == (variant.optimizer, variant.learning_rate)
    trained = done["model"]
    if variant.trains == "adapter":
        card = (out / "README.md").read_text()
        assert (out / "adapter_model.safetensors").is_file() and "import hf_vpt" in card
        # the accuracy goes to the card as a number, so the Hub reads it from the YAML model-index too
        metadata = yaml.safe_load(card.split("---\n")[1])
        (result,) = metadata["model-index"][0]["results"]
        accuracy = round(results["eval_accuracy"], 6)  # recipes/_common.save_adapter rounds the card's metrics
        assert result["metrics"] == [{"type": "accuracy", "name": "accuracy", "value": accuracy}]
        assert f"| accuracy | {accuracy} |" in card and "| trained head | `classifier` (2 labels) |" in card
        assert not (out / "model.safetensors").exists()  # the frozen backbone is not copied
        reloaded = PeftModel.from_pretrained(fresh_base(tiny), out)
    else:
        reloaded = AutoModelForImageClassification.from_pretrained(out)
        assert reloaded.config.id2label == {0: "dark", 1: "light"}
    torch.testing.assert_close(logits(reloaded), logits(trained), rtol=0, atol=1e-6)
    # a fresh model with its new random head disagrees: the comparison above is not vacuous
    assert not torch.allclose(logits(fresh_base(tiny)), logits(trained), atol=1e-3)


def test_an_empty_training_loader_is_an_error_not_an_endless_loop():
    from types import SimpleNamespace

    import training

    with pytest.raises(ValueError, match="training data loader is empty"):
        training.resolve_max_train_steps(SimpleNamespace(max_train_steps=None, num_train_epochs=3), 0)


def test_train_and_validation_folders_with_different_parents(tiny, tmp_path):
    """`--validation_dir` elsewhere than `--train_dir` (e.g. a held-out set in another place): the class names come
    from the sub-folders of both, as one label set."""
    elsewhere = tmp_path / "somewhere" / "held-out"
    shutil.copytree(tiny / "val", elsewhere)
    _, data_args, _ = recipe.parse_args(base_args(tiny, tmp_path / "out", "--validation_dir", str(elsewhere)))
    train, validation, names = recipe.load_image_dataset(data_args, seed=0)
    assert names == LABELS
    assert sorted(set(validation["label"])) == [0, 1] and len(validation) == 2 * 3
    assert sorted(set(train["label"])) == [0, 1]


def test_options_from_json_and_yaml_files(tiny, tmp_path, capsys):
    cli = base_args(tiny, tmp_path / "out", "--method", "lora", "--learning_rate", "0.003", "--num_train_epochs", "2")
    options = {"model_name_or_path": str(tiny / "tiny-vit"), "train_dir": str(tiny / "train"),
               "output_dir": str(tmp_path / "out"), "num_prompt_tokens": 2, "per_device_train_batch_size": 4,
               "disable_tqdm": True, "method": "lora", "learning_rate": 0.003, "num_train_epochs": 2}  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(options))
    (tmp_path / "args.yaml").write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    expected = recipe.parse_args(cli)
    for path in ("args.json", "args.yaml"):
        parsed = recipe.parse_args([str(tmp_path / path)])
        for got, want in zip(parsed, expected):
            assert {k: v for k, v in vars(got).items() if k != "command"} == {
                k: v for k, v in vars(want).items() if k != "command"
            }
    (tmp_path / "bad.json").write_text(json.dumps({**options, "batch_size": 4}))
    for bad in ([str(tmp_path / "bad.json")], [*cli, "--batch_size", "4"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)
        assert "batch_size" in capsys.readouterr().err


def test_resume_is_bit_exact_with_adapter_only_checkpoints(tiny, tmp_path, capsys):
    """Stopped after 4 of 9 steps and resumed, a VPT-deep run ends with the adapter and head of an uninterrupted
    run, bit for bit, with prompt dropout and random flips drawing random numbers on the way (so the restored RNG
    states and data position matter); the progress bar goes on from step 4; only the newest checkpoint is kept, and
    it holds the trainable tensors only."""
    # 10 images, of which the seeded 0.15 split trains on 8; batch 3: 3 batches a step each, 3 epochs = 9 steps.
    common = ["--method", "vpt_deep", "--prompt_dropout", "0.1", "--random_flip", "--learning_rate", "0.5",
              "--per_device_train_batch_size", "3", "--num_train_epochs", "3"]  # fmt: skip
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    done = recipe.main([*base_args(tiny, straight, *common), "--disable_tqdm", "false"])
    total = done["steps"]
    assert done["finished"] and total == 9  # the stop at step 4 below is in the middle of the second epoch
    assert not [name for name in os.listdir(straight) if name.startswith("checkpoint-")]
    capsys.readouterr()

    resumable = [
        *base_args(tiny, interrupted, *common),
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
    ]
    stopped = recipe.main([*resumable, "--stop_after_steps", "4"])
    assert stopped == {"steps": 4, "finished": False, "mixed_precision": "no"}
    assert sorted(name for name in os.listdir(interrupted) if name.startswith("checkpoint-")) == ["checkpoint-4"]
    saved = load_file(interrupted / "checkpoint-4" / "model.safetensors")
    trainable = {name for name, p in done["model"].named_parameters() if p.requires_grad}
    assert set(saved) == trainable and any("prompt" in key for key in saved)
    assert sum(t.numel() for t in saved.values()) < 0.1 * sum(p.numel() for p in done["model"].parameters())
    assert (interrupted / "checkpoint-4" / "optimizer.bin").is_file()
    assert json.loads((interrupted / "checkpoint-4" / "training_state.json").read_text())["step"] == 4
    capsys.readouterr()

    resumed = recipe.main([*resumable, "--resume_from_checkpoint", "latest", "--disable_tqdm", "false"])
    assert resumed["finished"] and resumed["steps"] == total
    bar = capsys.readouterr().err
    counts = [int(n) for n in re.findall(rf"(\d+)/{total} \[", bar)]
    assert counts and counts[0] == 4 and counts[-1] == total, bar[-500:]
    expected = load_file(straight / "adapter_model.safetensors")
    actual = load_file(interrupted / "adapter_model.safetensors")
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
    initial = fresh_base(tiny).state_dict()
    assert not torch.equal(done["model"].base_model.model.classifier.modules_to_save["default"].weight,
                           initial["classifier.weight"])  # fmt: skip
    assert resumed["eval_accuracy"] == done["eval_accuracy"]


def test_bf16_from_the_launcher_environment(tiny, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION=bf16: the recipe's accelerator
    takes it (no default of its own overrides it) and the training forward runs under bf16 autocast; an explicit
    --mixed_precision no wins over the launcher."""
    seen = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        done = recipe.main(base_args(tiny, tmp_path / "bf16", "--method", "vpt_deep", "--max_train_steps", "1"))
        assert done["mixed_precision"] == "bf16"
        assert seen and all(enabled and dtype == torch.bfloat16 for enabled, dtype in seen)
        seen.clear()
        AcceleratorState._reset_state(True)
        done = recipe.main(base_args(tiny, tmp_path / "fp32", "--max_train_steps", "1", "--mixed_precision", "no"))
        assert done["mixed_precision"] == "no"
        assert seen and all(not enabled and dtype == torch.float32 for enabled, dtype in seen)
    finally:
        handle.remove()


def _startup_error(tiny, tmp_path, capsys, *extra) -> str:
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        recipe.main(base_args(tiny, out, *extra))
    assert not out.exists()  # nothing was loaded or written
    return capsys.readouterr().err


def test_startup_errors_name_the_fix(tiny, tmp_path, capsys, monkeypatch):
    import accelerate.utils
    import huggingface_hub

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)  # (not installed here either)
    assert "tensorboard is not installed; `pip install tensorboard`, or pass --report_to none" in _startup_error(
        tiny, tmp_path, capsys, "--report_to", "tensorboard"
    )
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    assert "wandb is not installed" in _startup_error(tiny, tmp_path, capsys, "--report_to", "wandb")
    assert "unknown tracker(s) ['nope']" in _startup_error(tiny, tmp_path, capsys, "--report_to", "nope")

    assert "HF_HUB_OFFLINE is set" in _startup_error(tiny, tmp_path, capsys, "--push_to_hub")
    assert "is not a valid repo id" in _startup_error(
        tiny, tmp_path, capsys, "--push_to_hub", "--hub_model_id", "a/b/c"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # as if never logged in
    assert "needs a Hub token" in _startup_error(tiny, tmp_path, capsys, "--push_to_hub")

    assert "give your images with --train_dir" in str(
        pytest.raises(SystemExit, recipe.parse_args, ["--model_name_or_path", "m"]).value
    )
    assert "--prompt_dropout applies to VPT and gated prompts" in str(
        pytest.raises(
            SystemExit, recipe.parse_args, base_args(tiny, tmp_path, "--method", "lora", "--prompt_dropout", "0.1")
        ).value  # fmt: skip
    )
    assert "--checkpointing_steps takes a positive number of steps or 'epoch'" in _startup_error(
        tiny, tmp_path, capsys, "--checkpointing_steps", "often"
    )
    assert "there is no checkpoint in" in _startup_error(tiny, tmp_path, capsys, "--resume_from_checkpoint", "latest")
    missing = tmp_path / "checkpoint-7"
    assert "no such folder" in _startup_error(tiny, tmp_path, capsys, "--resume_from_checkpoint", str(missing))
    assert "--per_device_train_batch_size must be a positive integer" in _startup_error(
        tiny, tmp_path, capsys, "--per_device_train_batch_size", "0"
    )


def test_an_image_size_other_than_the_models(tiny, tmp_path):
    """--image_size 48 on a 32-pixel ViT: the position embeddings are interpolated, and the saved image processor
    preprocesses at 48 pixels as training did."""
    from PIL import Image
    from transformers import AutoImageProcessor

    out = tmp_path / "out"
    done = recipe.main(base_args(tiny, out, "--image_size", "48", "--max_train_steps", "1"))
    assert done["finished"]
    image = Image.fromarray(np.full((20, 20, 3), 120, dtype="uint8"))
    pixels = AutoImageProcessor.from_pretrained(out)(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (48, 48)
    reloaded = PeftModel.from_pretrained(fresh_base(tiny), out).eval()
    with torch.no_grad():
        expected = done["model"].eval()(pixel_values=pixels, interpolate_pos_encoding=True).logits
        got = reloaded(pixel_values=pixels, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
